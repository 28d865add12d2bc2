#compdef nl

_nl_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _NL_COMPLETE=complete_zsh nl)
}

compdef _nl_completion nl

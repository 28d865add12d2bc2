# `make serve` and `make test` each do the whole set-up first (scripts/setup.sh, idempotent).
.PHONY: setup serve test

setup:
	@bash scripts/setup.sh

serve: setup
	.venv/bin/nl serve $(ARGS)

test: setup
	.venv/bin/python -m pytest -q -rs $(ARGS)

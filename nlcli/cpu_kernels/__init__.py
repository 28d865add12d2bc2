"""nl's own CPU kernels, in C: small-batch matmuls over 4- and 8-bit block weights and decode
attention that reads the paged KV pool in place. `build` compiles them once per machine (the host
C compiler, `-march=native`) and `ops` calls them on torch tensors; where no compiler is found the
engine keeps torch's kernels (`ops.available()` says which, and why)."""

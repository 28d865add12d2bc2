"""KV memory: ReqToTokenPool, TokenToKVPool and its allocator, and the radix prefix cache."""

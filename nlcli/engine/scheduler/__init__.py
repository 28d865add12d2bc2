"""The engine process's CPU bookkeeping: the scheduling loop, requests, policy, KV memory plans,
output handling, grammar and embedding steps, and the engine side of weight updates."""

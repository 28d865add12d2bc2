"""The API process: HTTP routes, request parsing and validation, tokenization, streaming, metrics.

Nothing here imports the model side (scheduler, model_executor, models, layers, kernels); a test
enforces it, so this process stays light and can be tested against a fake engine."""

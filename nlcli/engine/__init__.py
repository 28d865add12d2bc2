"""The serving engine: server args, scheduler, caches, model runner, models and layers."""

"""Data parallelism in the API process: routing requests over --dp-size engine groups (router.py,
approx_radix.py) and merging what the groups answer (fan_in.py). Torch-free, like all of api/."""

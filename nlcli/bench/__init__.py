"""`nl bench`: a load generator for a running server, in the manner of SGLang's bench_serving.

datasets.py builds the prompts, driver.py sends them (streaming /generate, Poisson arrivals,
bounded concurrency), report.py turns the per-request timings into the summary. No torch here.
"""

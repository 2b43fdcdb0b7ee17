"""`synthalign bench` and `python -m pipelines.bench.shapes`: the benchmarks."""

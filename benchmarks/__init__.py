"""p2ppay's benchmark, kept beside the package, not in it: ``python -m benchmarks.bench``."""

"""preftune against TRL on the same model, data and settings: `python -m benchmarks.bench --help`."""

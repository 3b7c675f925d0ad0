"""Benchmarks run by `lorakit bench <name>` (one module per benchmark: add_arguments(parser), run(args))."""

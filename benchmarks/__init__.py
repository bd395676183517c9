"""Performance benchmarks for bannermatch: ``python -m benchmarks --help``."""

"""Benchmarks of the control plane, run on demand (`python -m bench.watch`); see docs/benchmarks.md.

Nothing here is a test: the scripts print their numbers and write JSON under `.bench-out/`.
"""

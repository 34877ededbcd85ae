"""Benchmarks of the bridge against a straightforward reference and against ceilings.

Run ``python -m bench`` from the repository root; see bench/README.md.
"""

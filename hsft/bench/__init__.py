"""Benchmarks whose numbers go into BENCHMARKS.md (targets are measured here, never asserted in tests)."""

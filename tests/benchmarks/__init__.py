"""Benchmarks: Den against the raw engine, reported as ratios (never collected by pytest)."""

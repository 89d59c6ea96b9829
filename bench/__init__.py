"""Benchmarks: run on a GPU machine, compare in one run on one card, write results/."""

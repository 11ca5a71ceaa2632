"""Benchmark harness: the gateway against its peers on one machine (see bench/README.md)."""

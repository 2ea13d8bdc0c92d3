"""Benchmarks: run with `just bench`; they print tables and write JSON and PNG, they are not tests."""

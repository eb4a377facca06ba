"""Helpers for tests, benchmarks and the demo: synthetic photos and a loopback HTTP server."""

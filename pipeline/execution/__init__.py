"""Execution layer: backends, the partition engine, and the code that runs in tasks."""

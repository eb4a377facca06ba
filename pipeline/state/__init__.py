"""State layer: what a run leaves in its run directory (results, report)."""

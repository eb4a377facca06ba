"""`make bench`: the side-by-side performance benchmark (a script, not a test)."""

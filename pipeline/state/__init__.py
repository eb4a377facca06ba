"""State layer: the run directory across runs.

`results` (the latest run's records and report), `manifest` (every item's status and the
sinks it is done for, in SQLite), `incremental` (what is left to do), `lineage` (sink
fingerprints), `lock` (one run at a time), `history` (one report per run) and `rundir`
(file names, temp-file cleanup, the optional log file).
"""

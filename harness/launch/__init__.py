"""Launching work: a run with every check (options, run), a sweep of jobs (sweep), a benchmark of rows (speed)."""

"""What runs mean: result records, the counting rule and verdicts, the end of a run, benchmark.md and its figure."""

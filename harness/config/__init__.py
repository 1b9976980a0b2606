"""The recipe: experiment specs, the resolved training plan and its one budget formula, the benchmark's fixed facts."""

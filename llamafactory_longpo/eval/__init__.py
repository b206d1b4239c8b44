"""Long-context evaluation: RULER-style tasks, the runner, plots."""

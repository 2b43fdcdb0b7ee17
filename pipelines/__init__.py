"""Jobs (generate, train, eval), the run config and the `synthalign` CLI."""

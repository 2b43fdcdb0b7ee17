"""`python -m pipelines.cli ...`: the same entry point as the `synthalign` command."""
import sys

from pipelines.cli import main

sys.exit(main())

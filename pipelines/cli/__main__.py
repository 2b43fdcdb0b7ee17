"""`python -m pipelines.cli` (the tests run the CLI this way, as the `synthalign` script does)."""
import sys

from pipelines.cli import main

sys.exit(main())

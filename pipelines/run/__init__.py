"""`synthalign run`: generate, train, evaluate and report on one run folder."""

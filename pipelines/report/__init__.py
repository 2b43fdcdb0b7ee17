"""`synthalign report` and `synthalign export`: what a finished run is turned into."""

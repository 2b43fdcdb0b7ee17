"""`synthalign generate`: the stage chain on Ray Data and the run folder it writes."""

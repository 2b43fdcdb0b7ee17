"""Where and how stages run: resources per pool, the Ray connection, job submission."""

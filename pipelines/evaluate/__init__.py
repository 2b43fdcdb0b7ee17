"""Evaluation: POPE, MMHal-Bench and CHAIR scoring (pure Python), answering on Ray Data, and base vs adapter
on held-out images of a run's own world."""

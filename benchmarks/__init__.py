"""The benchmarks, run from a clone: `python -m benchmarks --out DIR` (the suite), `python -m benchmarks.shapes`,
`python -m benchmarks.loop`. Not part of the installed package."""

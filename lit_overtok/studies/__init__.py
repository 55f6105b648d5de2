"""Studies: grids of runs (sweeps), reading a run's logs, convergence speedups, and the reports under ``results/``."""

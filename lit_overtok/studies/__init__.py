"""Studies: grids of training runs, their convergence speedups, seed-paired verdicts and reports."""

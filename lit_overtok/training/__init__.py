"""Training with Lightning: the LightningModule, its callbacks (throughput, progress, lm-eval), the global batch, the
dashboards and the end-of-run summary."""

"""Scale-out: Lightning strategies for row-sharded Over-Encoding tables, the model's parallel setup, and the per-rank
memory estimate."""

"""Optimization: AdamW parameter groups (``groups``), the warmup-cosine schedule (``schedule``), their settings
(``config``), the sparse-row AdamW for Over-Encoding tables (``sparse_adamw``), and ``build`` which assembles them."""

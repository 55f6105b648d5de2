"""lit_overtok: a PyTorch Lightning template for Over-Tokenized Transformers (Huang et al., ICML 2025)."""

__version__ = "0.1.0"

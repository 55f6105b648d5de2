"""Synthetic training data: the Physics-of-LMs context-free grammars and their Lightning DataModule."""

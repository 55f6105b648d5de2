"""Training data: the Physics-of-LMs context-free grammars and their DataModule (the default run's data), and text
prepared into WebDataset shards of token ids with the DataModule that streams them (docs/data.md)."""

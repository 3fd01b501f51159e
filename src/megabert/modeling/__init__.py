"""The MegatronBERT model family: layers, attention backends, the base model, task heads and checkpoint I/O."""

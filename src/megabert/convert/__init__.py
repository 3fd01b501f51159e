"""Checkpoint conversion between Megatron-LM layouts and the Hugging Face layout."""

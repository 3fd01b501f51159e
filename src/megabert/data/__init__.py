"""Data: Megatron's indexed token datasets, pretraining samples and masking, task file readers."""

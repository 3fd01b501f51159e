"""Training: one loop for pretraining and fine-tuning, checkpoints, metrics, torch.distributed plans."""

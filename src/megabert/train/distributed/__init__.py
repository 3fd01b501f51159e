"""Training on torch.distributed: the (dp, tp) mesh, tensor-parallel plan, DDP/FSDP2, sharded checkpoints."""

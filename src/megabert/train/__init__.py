"""Training, in three rooms: ``engine`` (the loop, optimizer, schedule, checkpoints, logging),
``distributed`` (process group, tensor/data parallelism, sharded checkpoints, applied from
outside the model) and ``jobs`` (pretraining and fine-tuning, built on the other two)."""

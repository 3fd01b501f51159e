"""The training loop and what it needs for any job: optimizer, schedule, checkpoints, logging, memory."""

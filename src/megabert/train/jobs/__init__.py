"""The jobs users run on the engine: pretraining and fine-tuning (data, model, evaluation, metrics)."""

"""Inference: pipelines for every head and ONNX export."""

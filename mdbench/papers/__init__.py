"""Experiment glue of the paper notebooks: one module per paper (data as tensors, cached features, method runners)."""

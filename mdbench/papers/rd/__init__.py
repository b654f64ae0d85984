"""Reprogramming Distillation (Zhou et al., MICCAI 2024): reprogram a frozen foundation model, co-train a student.

- :mod:`mdbench.papers.rd.experiment`: data as tensors, cached FM features, method runners, deployment costs.
"""

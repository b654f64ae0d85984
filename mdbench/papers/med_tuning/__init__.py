"""Med-Tuning (Shen et al., MIDL 2024): Med-Adapters on a frozen 2D backbone for 3D segmentation.

- :mod:`mdbench.papers.med_tuning.experiment`: volumes as tensors, each table row's model, training, scores, costs.
- :mod:`mdbench.papers.med_tuning.cost`: what a run will cost (FLOPs per step, times steps, at a stated throughput).
"""

"""Lean deployment of box-prompted SAM models (DAFT): OpenVINO export, a torch-free runtime, a fresh-process timer.

- :mod:`~mdbench.papers.daft.deploy.export` (torch): export a :class:`mdbench.models.LiteMedSAM` to OpenVINO IR with
  parity checks and write a deployment folder (OpenVINO IR + PyTorch state dicts + manifest).
- :mod:`~mdbench.papers.daft.deploy.runtime` (numpy + OpenVINO): compiled experts, compiled-model disk cache, lazy
  loading.
- :mod:`~mdbench.papers.daft.deploy.predict`: the per-case command (``python -m mdbench.papers.daft.deploy.predict``);
  its OpenVINO path never imports torch.
- :mod:`~mdbench.papers.daft.deploy.timing`: seconds per case, each case in a fresh process, as the challenge measured.

This package imports nothing, so that the torch-free modules stay light. The challenge pre- and post-processing
they share with the models is numpy code in :mod:`mdbench.data.boxprompt`.
"""

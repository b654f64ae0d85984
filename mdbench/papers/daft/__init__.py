"""DAFT (data-aware fine-tuning) pipeline: routing, case inference, training stages, evaluation.

Modules (import them directly; this package imports nothing so that the torch-free ones stay light):

- :mod:`~mdbench.papers.daft.routing`: file-name router (the paper's) and a learned router from the image
  (numpy/sklearn).
- :mod:`~mdbench.papers.daft.inference`: challenge-format case reading and 2D / 3D box-prompt inference (numpy only).
- :mod:`~mdbench.papers.daft.cases`: case folders, splits and real-data conversion to challenge ``.npz`` cases.
- :mod:`~mdbench.papers.daft.training`: KD of the encoder, general fine-tuning, data-aware fine-tuning (torch).
- :mod:`~mdbench.papers.daft.evaluation`: DSC / NSD of one case with the challenge rule, the leaderboard averages
  and the per-case lines they are weighted means of.
- :mod:`~mdbench.papers.daft.experiment`: the glue: Table A (routed models on the test cases, leaderboard averages).
- :mod:`~mdbench.papers.daft.deploy`: OpenVINO export, the torch-free runtime, the per-case command and its timer.
"""

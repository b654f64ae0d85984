"""EFCM (Li & Diao, arXiv 2409.11817): feature projection distillation into a TransScan student for MIL.

- :mod:`mdbench.papers.efcm.experiment`: bags and splits, MIL training, cached teacher features, stage-1
  distillation, the stage-2 strategies (Reuse / Retrain / End-to-end CLAM), costs and figures.
"""

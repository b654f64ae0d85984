"""One home per paper: ``mdbench/papers/<paper>/``.

Every paper folder holds ``experiment.py`` (the glue its notebook calls), ``paper.yaml`` (the paper's reported numbers
and claims, read by :func:`mdbench.results.load_reference`) and the paper's own helper modules, if any. The
walkthrough ``quickstart`` has only its ``paper.yaml``. Nothing outside this package imports from it: papers sit on
top of data, models, losses and the shared machinery, and notebooks sit on top of papers.
"""

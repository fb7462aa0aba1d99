"""The engine: everything that reads or changes a model, with no Prefect and no MLflow.

Sub-packages, lowest layer first (a package imports only those above it in this list):

- ``pruning``: the methods, pure functions on one weight matrix and its statistics.
- ``data``: the calibration and evaluation texts and their token windows.
- ``engine``: models, decoder blocks, the statistics and gradient passes, the streamed prune.
- ``evaluation``: perplexity, zero-shot (lm-eval) and paired confidence intervals.
- ``reference``: training of the embedded reference model.

Top-level leaves, imported by all of them: ``errors`` (the one error type users see),
``process`` (atomic writes, owner-named temporary files), ``provenance`` (where a
result came from), ``env`` (environment defaults).
A test (tests/test_layout.py) imports each module alone and fails if anything under
``modules`` imports prefect or mlflow.
"""

"""The engine that applies a method to a whole model, one decoder block at a time.

``models`` (load, inspect and check checkpoints), ``blocks`` (find decoder blocks, their
linears, capture and replay their inputs), ``statistics`` (the Lightning pass that sums
each linear's input statistics), ``gradients`` (GBLM's gradient pass), ``driver`` (the
block-sequential prune and its typed report), ``masks`` (mask files in and out),
``plan`` (memory, disk and time of a prune from ``config.json`` alone; imports no torch).

May import: torch, transformers, lightning, ``modules.pruning``, ``modules.data`` and
the top-level leaves of ``modules``. Never prefect or mlflow.
"""

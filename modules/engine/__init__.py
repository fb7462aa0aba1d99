"""The engine that applies a method to a whole model, one decoder block at a time.

``models`` (load, inspect and check checkpoints), ``blocks`` (find decoder blocks, their
linears, capture and replay their inputs), ``statistics`` (the Lightning pass that sums
each linear's input statistics), ``gradients`` (GBLM's gradient pass), ``backward`` (the
same gradients by a block-wise backward, one block loaded at a time), ``driver`` (the
in-memory block-sequential prune, the reference of the streamed one), ``streaming``
(read a checkpoint one tensor at a time, write shards, activation stores), ``stages``
(the per-block stages of the streamed prune, from files to files), ``report`` (the
typed pruning report), ``masks`` (mask files in and out), ``plan`` (memory, disk and time
of a prune from ``config.json`` alone; imports no torch), ``launch`` (a flow's step on
several processes or machines: the child that joins the DDP run).

May import: torch, transformers, lightning, distributed (``launch``, on several machines),
``modules.pruning``, ``modules.data`` and the top-level leaves of ``modules``. Never
prefect or mlflow.
"""

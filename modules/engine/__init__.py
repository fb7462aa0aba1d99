"""The engine that applies a method to a whole model, one decoder block at a time.

``models`` (load, inspect and check checkpoints), ``blocks`` (find decoder blocks, their
linears, capture and replay their inputs), ``statistics`` (the Lightning pass that sums
each linear's input statistics), ``gradients`` (GBLM's gradient pass), ``backward`` (the
same gradients by a block-wise backward, one block loaded at a time), ``streaming``
(read a checkpoint one tensor at a time, write shards, activation stores), the streamed
prune: ``request`` (what to do to every block), ``job`` (what its stages share), ``files``
(the stages' files), ``stages`` and ``weight_stages`` (the per-block stages, from files to
files), ``passes`` (OWL's and GBLM's whole-model passes), ``loop`` (the table of stages and
the loop over blocks); ``report`` (the typed pruning report), ``masks`` (mask files in
and out), ``plan`` (memory, disk and time of a prune from ``config.json`` alone; imports
no torch), ``launch`` (a flow's step on several processes or machines: the child that
joins the DDP run).

May import: torch, transformers, lightning, distributed (``launch``, on several machines),
``modules.pruning``, ``modules.data`` and the top-level leaves of ``modules``. Never
prefect or mlflow.
"""

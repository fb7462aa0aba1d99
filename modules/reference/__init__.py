"""The embedded reference model: a small LLaMA trained on the embedded corpus.

``train`` rebuilds ``modules/assets/reference`` (``make reference``). Nothing else
imports this package: the model's folder is ``modules.engine.names.REFERENCE_DIR``.

May import: lightning, transformers, ``modules.data``, ``modules.evaluation``,
``modules.engine``.
"""

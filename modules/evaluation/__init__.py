"""Evaluation of a model: perplexity, lm-eval zero-shot tasks, paired intervals.

``perplexity`` (non-overlapping windows), ``zeroshot`` (lm-eval on the official seven or
the embedded suite, and the builder of that suite), ``intervals`` (paired bootstrap
and McNemar between a dense and a pruned model).

May import: torch, lm-eval, numpy, ``modules.data``, ``modules.engine`` (model checks)
and the top-level leaves of ``modules``.
"""

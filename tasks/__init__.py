"""Prefect tasks, one file per stage, and their cache keys.

``windows`` (calibration token windows, fingerprints), ``statistics`` (GBLM's
gradients), ``update`` (the prune), ``evaluate`` (perplexity, zero-shot, paired
intervals), ``track`` (one MLflow run per result), ``promote`` (the gate and the
registry); ``cache`` holds the key and artifact helpers they share.

A task computes nothing itself: it keys, calls ``modules`` or ``tracking``, and writes
its result under the work folder. May import: prefect, ``modules``, ``tracking``,
``configs``.
"""

"""Texts and token windows: the embedded corpus, local files, C4 and WikiText-2.

``corpus`` builds the embedded corpus from the standard library's sources; ``windows``
turns a named source or a file into calibration and evaluation token windows and
fingerprints it.

May import: torch, transformers' tokenizers, datasets/huggingface_hub (lazily, for the
Hub sources), and the top-level leaves of ``modules``.
"""

"""The pruning methods: one file per method, each a pure function on one linear layer.

``(W, stats, spec, **options) -> (W_pruned, keep)`` on fp32 tensors, with no model, no
hooks and no I/O. Leaves: ``stats`` (:class:`LayerStats`), ``sparsity`` (rates, N:M
patterns, exact k-lowest selection), ``numerics`` (input checks, damped Cholesky,
thread counts), ``traits`` (what each built-in method reads and which steps it runs,
torch-free, for the registry and ``topiary plan``). ``registry`` lists the methods with
what each needs and how its options are validated; a new method is one file here plus
one registry entry.

May import: torch, ``modules.errors`` and each other (methods import only the leaves;
ADMM's selectors are looked up through the registry).
"""

"""The YAML configs a user edits (``pipeline.yaml``, ``sweep.yaml``) and their typed schema.

``schema`` (pydantic models of every section, validated at load with every problem at
once; the CLI's flags and their help come from its fields), ``loader`` (YAML without
base-60 numbers, so ``2:4`` stays a pattern).

May import: pydantic, yaml, ``modules.errors`` and ``modules.pruning`` (to check method
names and options against the registry); never prefect or mlflow.
"""

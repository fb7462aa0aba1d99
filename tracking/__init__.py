"""MLflow: runs, metrics, artifacts and the model registry. The only importer of mlflow.

``runs`` (start, log and end runs, read them back), ``registry`` (the promotion gate
and the registered model's versions and aliases), ``plots`` and ``tables`` (figures and
tables logged as artifacts). Plain functions, usable without Prefect; the Prefect tasks
around them are ``tasks.track`` and ``tasks.promote``.

May import: mlflow, ``modules`` (provenance, errors, process) and ``configs``.
"""

#!/usr/bin/env bash
# The folder a GPU machine needs beside this tree for `make gpu-check` (docs/gpu-check.md): .whl/
# with the wheels the machine's image lacks, and .whl/topiary-commit (the commit and dirty flag of
# this checkout: the machine gets the tree without its .git).
#
# The image ('cuda', /work/.library/device/KINDS.md) holds torch, transformers, safetensors,
# tokenizers, pytest, pytorch-lightning, lightning-utilities and torchmetrics. Topiary imports
# `lightning` (not `pytorch_lightning`); KINDS.md lists `lightning` too, without a version, so its
# pinned wheel (pure Python, under 1 MB; its other needs are all in the image) is carried and
# installed only where `import lightning` fails. Prefect, MLflow and lm-eval are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
version=$(sed -n 's/^lightning==//p' requirements.lock)
mkdir -p .whl
rm -f .whl/*.whl .whl/topiary-commit
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "lightning==$version"
dirty=$([ -n "$(git status --porcelain)" ] && echo true || echo false)
echo "$(git rev-parse HEAD) $dirty" > .whl/topiary-commit
bytes=$(du -sb .whl | cut -f1)
if [ "$bytes" -gt $((64 * 1024 * 1024)) ]; then
    echo "gpu_wheels: .whl holds $bytes bytes, over the 64 MiB a device call carries" >&2
    exit 1
fi
echo "gpu_wheels: .whl ready ($bytes bytes): $(cd .whl && ls | tr '\n' ' ')"

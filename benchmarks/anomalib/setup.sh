#!/usr/bin/env bash
# Create (or complete) the anomalib peer-benchmark venv at benchmarks/anomalib/.venv.
# Idempotent: an existing venv is reused and pip skips what is already installed at the pin.
# Usage: benchmarks/anomalib/setup.sh   (PYTHON=python3.11 by default; needs network once)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3.11}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install "pip==26.3"  # the pip the pinned venv was built with
# torch and torchvision first, at the pinned versions, so anomalib does not pick others.
"$venv/bin/python" -m pip install "$(grep '^torch==' "$here/requirements.txt")" \
    "$(grep '^torchvision==' "$here/requirements.txt")"
"$venv/bin/python" -m pip install -r "$here/requirements.txt"
"$venv/bin/python" -c "import anomalib, torch, torchvision; print('anomalib', anomalib.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"

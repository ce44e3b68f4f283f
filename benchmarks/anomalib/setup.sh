#!/usr/bin/env bash
# Create (or complete) the anomalib peer-benchmark venv at benchmarks/anomalib/.venv.
# Idempotent: an existing venv is reused and pip skips what is already installed at the pin.
# Usage: benchmarks/anomalib/setup.sh   (PYTHON=python3.11 by default; needs the registry once)
# CPU only: torch 2.13.0 is the CPU wheel (see requirements.txt); no CUDA package is installed.
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
# The registry's torchvision is a CUDA build whose C++ ops cannot load on the CPU torch;
# torchvision_cpu_ops.py lets it import anyway (see its docstring).
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$here/torchvision_cpu_ops.py" "$site/torchvision_cpu_ops.py"
echo "import torchvision_cpu_ops" > "$site/torchvision_cpu_ops.pth"
"$venv/bin/python" -c "import anomalib, torch, torchvision; print('anomalib', anomalib.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"

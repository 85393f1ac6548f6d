#!/usr/bin/env bash
# Builds the development environment in .venv/ at the repository root and compiles the C++ extension.
# torch is pinned (constraints.txt) to the CPU build this machine class installs; any other request
# would pull several GB of CUDA wheels. Re-running is cheap: pip skips what is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
echo "==> torch (CPU build, pinned)"
$PIP install -q "$(grep '^torch==' constraints.txt)"
echo "==> build tools"
$PIP install -q -c constraints.txt "scikit-build-core>=0.10" "pybind11>=2.12"
echo "==> kt-plugins (compiles csrc/ with the system C++ compiler)"
$PIP install -q -c constraints.txt --no-build-isolation -e ".[dev]"
echo "==> DeepSpeed (the extra kt-plugins[deepspeed]; its CUDA ops are not built: the tests run its CPU accelerator)"
DS_BUILD_OPS=0 $PIP install -q -c constraints.txt --no-build-isolation "$(grep '^deepspeed==' constraints.txt)"
echo "==> LLaMA-Factory (stock, from PyPI) and its requirements, minus torch / torchvision / torchaudio"
$PIP install -q -c constraints.txt --no-deps "$(grep '^llamafactory==' constraints.txt)"
$PIP install -q -c constraints.txt -r requirements/llamafactory.txt
# PyPI's torchaudio is a CUDA build; LLaMA-Factory imports it at module level. The CPU test environment
# gets a stand-in (scripts/shims/), never shipped in the package.
SITE=$($VENV/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if ! $VENV/bin/python -c "import torchaudio" 2>/dev/null; then
  $PIP uninstall -q -y torchaudio 2>/dev/null || true
  cp -r scripts/shims/torchaudio "$SITE/"
fi
$VENV/bin/python -c "import kt_core; print('kt_core ready; kernels:', ', '.join(kt_core.available_kernels()))"

#!/usr/bin/env bash
# Builds .venv-sglang/: stock SGLang on the CPU build of torch, plus kt-plugins (editable), for
# integration_tests/test_sglang.py. SGLang's GPU packages (sglang-kernel, flashinfer, deep-gemm, ...) are
# left out: its FusedMoE layer runs on the CPU through torch-native code. Nothing may resolve torch
# freely (a CUDA torch is several GB): sglang and torchvision go in with --no-deps, everything else with
# constraints-sglang.txt. Re-running is cheap: pip skips what is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv-sglang
C="-c constraints-sglang.txt"
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
echo "==> torch (CPU build, pinned)"
$PIP install -q "$(grep '^torch==' constraints-sglang.txt)"
echo "==> sglang and torchvision, without their dependencies"
$PIP install -q --no-deps "$(grep '^sglang==' constraints-sglang.txt)" "$(grep '^torchvision==' constraints-sglang.txt)"
echo "==> sglang's pure-Python dependencies (its GPU kernels stay out)"
# sglang 0.5.21's requirements minus the CUDA-only packages (sglang-kernel, flashinfer, flash-attn-4,
# deep-ep / deep-gemm, cutlass-dsl, mathdx, nvshmem, quack, tilelang, humming, tokenspeed-mla, cuda-tile,
# torchaudio / torchcodec), at sglang's own pins; timm goes in --no-deps so that it cannot pull torchvision's own torch.
$PIP install -q $C \
  aiohttp "anthropic>=0.20.0" blobfile==3.0.0 build compressed-tensors==0.18.0 datasets distro easydict einops \
  fastapi gguf interegular IPython "llguidance>=1.7.6,<2" "mistral_common>=1.11.5" msgspec ninja \
  numpy nvidia-ml-py openai==2.6.1 openai-harmony==0.0.4 orjson partial_json_parser pillow \
  "prometheus-client>=0.20.0" psutil pybase64 pydantic python-multipart "pyzmq>=25.1.2" regex \
  requests scipy sentencepiece==0.2.1 setproctitle soundfile==0.13.1 tiktoken tokenizers==0.22.2 transformers tqdm uvicorn \
  uvloop watchfiles xgrammar==0.2.7 xxhash zstandard "cuda-python>=13.0" "apache-tvm-ffi==0.1.11" \
  "smg-grpc-servicer>=0.9.0" torch_memory_saver
$PIP install -q --no-deps timm==1.0.16
echo "==> build tools, pytest"
$PIP install -q $C "scikit-build-core>=0.10" "pybind11>=2.12" "pytest>=8" "pluggy>=1.3" "safetensors>=0.4" pyyaml
echo "==> kt-plugins (compiles csrc/ with the system C++ compiler)"
$PIP install -q $C --no-build-isolation --no-deps -e .
# `import sglang` needs integration_tests/sglang_cpu.py's torchvision stubs on a CPU-only machine: check
# the metadata and our entry point instead.
$VENV/bin/python - <<'PY'
from importlib.metadata import entry_points, version
import kt_core
plugins = [ep.value for ep in entry_points(group="sglang.srt.plugins")]
assert "kt_plugins.sglang:register" in plugins, f"kt-plugins entry point not registered: {plugins}"
print("sglang", version("sglang"), "| torch", version("torch"), "| kernels:", ", ".join(kt_core.available_kernels()))
PY

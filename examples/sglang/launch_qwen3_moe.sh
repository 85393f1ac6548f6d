#!/usr/bin/env bash
# Serves a MoE checkpoint with stock SGLang, routed experts on the CPU through kt-plugins.
#
#   pip install "kt-plugins[sglang]"          # SGLang >= 0.5.11 (tested: 0.5.20 - 0.5.21)
#   examples/sglang/launch_qwen3_moe.sh /models/Qwen3-30B-A3B [ADAPTER_DIR]
#
# The experts are read from the same checkpoint (bf16 safetensors), no conversion step. Knobs, by env var:
#   GPU_EXPERTS   experts per layer kept on the GPU: a count or a ratio in [0, 1) (default 0: all on the CPU)
#   CPU_THREADS   CPU threads for the experts (default: every CPU this process may use)
#   KERNEL        auto | avx512_bf16 | avx2 | ... (python -c "import kt_core; print(kt_core.available_kernels())")
#   CHUNK_SIZE    tokens per CPU kernel call in long prefills (default: whole batch)
#   PORT          default 30000
set -euo pipefail
MODEL=${1:?usage: $0 MODEL_DIR [PEFT_ADAPTER_DIR]}
ADAPTER=${2:-}

args=(
  --model-path "$MODEL"
  --kt-experts
  --kt-experts-gpu-experts "${GPU_EXPERTS:-0}"
  --kt-experts-kernel "${KERNEL:-auto}"
  --port "${PORT:-30000}"
)
[ -n "${CPU_THREADS:-}" ] && args+=(--kt-experts-cpu-threads "$CPU_THREADS")
[ -n "${CHUNK_SIZE:-}" ] && args+=(--kt-experts-chunk-size "$CHUNK_SIZE")
if [ -n "$ADAPTER" ]; then
  # Expert LoRA: the CPU experts (merged into GPU-resident experts at load); the rest of the adapter:
  # SGLang's own LoRA serving.
  args+=(--kt-experts-lora "$ADAPTER" --enable-lora --lora-paths "adapter=$ADAPTER")
fi
exec python -m sglang.launch_server "${args[@]}"

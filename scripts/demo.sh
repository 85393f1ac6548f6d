#!/usr/bin/env bash
# The main job on the bundled tiny default: build the tiny Qwen3-MoE checkpoint, fine-tune it with stock
# LLaMA-Factory and `use_kt: true` (routed experts on the CPU operator, expert LoRA included), then ask
# the fine-tuned model a question through `llamafactory-cli chat`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
CKPT=out/tiny-qwen3-moe

echo "==> 1/3 tiny Qwen3-MoE checkpoint (random init from examples/tiny_moe/qwen3_moe/config.json)"
[ -f "$CKPT/config.json" ] || $BIN/python examples/tiny_moe/make_checkpoint.py "$CKPT" 2>/dev/null

echo "==> 2/3 LoRA fine-tuning with use_kt: true (examples/llamafactory/tiny_qwen3moe_lora_sft_kt.yaml)"
USE_KT=1 $BIN/llamafactory-cli train examples/llamafactory/tiny_qwen3moe_lora_sft_kt.yaml 2>&1 \
  | grep -E "kt_plugins|trainable params|'loss'|train_loss|Figure saved" | sed -E 's/^.*(\{.loss)/  \1/'

echo "==> 3/3 chat with the fine-tuned model (examples/llamafactory/tiny_qwen3moe_infer_kt.yaml)"
printf 'Who are you?\nexit\n' | $BIN/llamafactory-cli chat examples/llamafactory/tiny_qwen3moe_infer_kt.yaml 2>/dev/null \
  | grep -E "Assistant:" | sed "s/^User: Assistant:/  Who are you? ->/"
echo "Adapter (stock PEFT format, expert LoRA included): out/saves/tiny-qwen3-moe-lora"

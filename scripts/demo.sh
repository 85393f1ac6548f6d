#!/usr/bin/env bash
# The main job on the bundled tiny default: build the tiny Qwen3-MoE checkpoint, fine-tune it with stock
# LLaMA-Factory and `use_kt: true` (routed experts on the CPU operator, expert LoRA included), then ask
# the fine-tuned model a question through `llamafactory-cli chat`.
# Each step's full output goes to out/demo-logs/<step>.log; the summary lines are shown, and when a step
# fails, its error line and the end of its log are shown and the demo stops with that step's status.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
CKPT=out/tiny-qwen3-moe
LOGS=out/demo-logs
mkdir -p "$LOGS"

# run_step NAME COMMAND...: runs COMMAND with its output in $LOGS/NAME.log; on failure shows why and exits.
run_step() {
  local log="$LOGS/$1.log" status=0
  shift
  "$@" >"$log" 2>&1 || status=$?
  if [ "$status" -ne 0 ]; then
    echo "!! failed (exit status $status); the error:" >&2
    grep -E "^([A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Warning)|Error|error)\b" "$log" | tail -n 3 | sed 's/^/   /' >&2 || true
    echo "   last lines of $log:" >&2
    tail -n 12 "$log" | sed 's/^/   | /' >&2
    exit "$status"
  fi
}

train() { USE_KT=1 $BIN/llamafactory-cli train examples/llamafactory/tiny_qwen3moe_lora_sft_kt.yaml; }
chat() {
  printf 'Who are you?\nexit\n' | $BIN/llamafactory-cli chat examples/llamafactory/tiny_qwen3moe_infer_kt.yaml
}

echo "==> 1/3 tiny Qwen3-MoE checkpoint (random init from examples/tiny_moe/qwen3_moe/config.json)"
[ -f "$CKPT/config.json" ] || run_step checkpoint $BIN/python examples/tiny_moe/make_checkpoint.py "$CKPT"

echo "==> 2/3 LoRA fine-tuning with use_kt: true (examples/llamafactory/tiny_qwen3moe_lora_sft_kt.yaml)"
run_step train train
grep -E "kt_plugins|kt-plugins|trainable params|'loss'|train_loss|Figure saved" "$LOGS/train.log" \
  | sed -E 's/^.*(\{.loss)/  \1/' || true

echo "==> 3/3 chat with the fine-tuned model (examples/llamafactory/tiny_qwen3moe_infer_kt.yaml)"
run_step chat chat
grep -E "Assistant:" "$LOGS/chat.log" | sed "s/^User: Assistant:/  Who are you? ->/" || true
echo "Adapter (stock PEFT format, expert LoRA included): out/saves/tiny-qwen3-moe-lora; logs: $LOGS/"

"""LoRA-fine-tunes the bundled tiny MoE with the stock Hugging Face Trainer, routed experts on the CPU.

Everything is stock transformers + PEFT except one line: `callbacks=[KTCallback()]`. Expert LoRA is
declared the PEFT way (`target_parameters` on the fused experts), attention LoRA with `target_modules`;
the adapter it saves is a normal PEFT adapter, which the script reloads onto the plain model with stock
PEFT to show that the logits agree.

With `--from-checkpoint` the model comes from a checkpoint folder through `kt_core.load_model` (the way
for models larger than the GPU: the experts stream straight into host RAM); with `--merge` the adapter is
also merged (`merge_and_unload`) and written as a plain transformers checkpoint.

    .venv/bin/python examples/hf_trainer/train_tiny.py
    .venv/bin/python examples/hf_trainer/train_tiny.py --from-checkpoint --merge --out /tmp/tiny_lora
    .venv/bin/python examples/hf_trainer/train_tiny.py --steps 100 --kernel portable --out /tmp/tiny_lora
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

import kt_core
from kt_plugins.hf_trainer import KTCallback

HERE = Path(__file__).resolve().parent
TINY_CONFIG = HERE.parent / "tiny_moe" / "qwen3_moe" / "config.json"


def build_model(config_path: Path, seed: int) -> torch.nn.Module:
    """The tiny MoE with random weights (the same ones for the same seed)."""
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(config_path)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def counting_dataset(vocab: int, n: int, seq: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences that count up from a random start (mod vocab): learnable, so the loss visibly drops."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(3, vocab, (n, 1), generator=g)
    ids = 3 + (starts - 3 + torch.arange(seq)) % (vocab - 3)  # [n, seq], skipping the special ids
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=TINY_CONFIG)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--kernel", default="auto", help="CPU kernel of the experts (auto, avx2, portable, ...)")
    parser.add_argument("--cpu-infer", type=int, default=None, help="CPU threads of the experts operator")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-checkpoint", action="store_true", help="load the model with kt_core.load_model")
    parser.add_argument("--merge", action="store_true", help="also write the merged model (merge_and_unload)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="kt_hf_trainer_"))

    if args.from_checkpoint:
        # A real run starts from a downloaded checkpoint; here the tiny model is written to one first.
        build_model(args.config, args.seed).save_pretrained(out / "base")
        model = kt_core.load_model(out / "base", device="cpu", dtype=torch.float32, kernel=args.kernel, progress=False)
    else:
        model = build_model(args.config, args.seed)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,  # PEFT does not implement dropout for target_parameters
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = get_peft_model(model, lora)
    training_args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8,
        max_steps=args.steps,
        learning_rate=1e-2,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    data = counting_dataset(model.config.vocab_size, n=256, seq=32, seed=args.seed)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data,
        callbacks=[KTCallback(kernel=args.kernel, cpu_infer=args.cpu_infer)],
    )
    trainer.train()  # logs loss, kt_tokens_per_s and kt_cpu_expert_share every 10 steps

    adapter_dir = out / "adapter"
    model.save_pretrained(adapter_dir)
    print(f"adapter written to {adapter_dir}")

    # Stock PEFT on the plain transformers model, no kt-plugins involved: the logits agree.
    plain = PeftModel.from_pretrained(build_model(args.config, args.seed), adapter_dir).eval()
    model.eval()
    ids = torch.stack([row["input_ids"] for row in data[:4]])
    with torch.no_grad():
        ours, stock = model(input_ids=ids).logits, plain(input_ids=ids).logits
    diff = ((ours - stock).abs().max() / stock.abs().max()).item()
    print(f"max |logits - stock PEFT logits| / max |logits| = {diff:.2e}")

    if args.merge:
        # The expert LoRA is merged into the CPU experts' weights, the rest by PEFT: a plain transformers model.
        merged = model.merge_and_unload()
        merged.save_pretrained(out / "merged")
        reloaded = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        with torch.no_grad():
            merged_logits = reloaded(input_ids=ids).logits
        diff = ((merged_logits - stock).abs().max() / stock.abs().max()).item()
        print(f"merged model written to {out / 'merged'}; max |logits - stock PEFT logits| / max |logits| = {diff:.2e}")


if __name__ == "__main__":
    main()

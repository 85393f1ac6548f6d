"""Writes the bundled tiny MoE as a checkpoint folder: random-init weights from config.json plus a small
byte-level BPE tokenizer trained on the bundled dataset (no model hub needed).

    .venv/bin/python examples/tiny_moe/make_checkpoint.py out/tiny-qwen3-moe
    .venv/bin/python examples/tiny_moe/make_checkpoint.py out/tiny-deepseek-v3 --config examples/tiny_moe/deepseek_v3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
DATASET = HERE.parent / "llamafactory" / "data" / "kt_identity.json"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    records = json.loads(DATASET.read_text())
    corpus = [r["instruction"] + " " + r["output"] for r in records] + ["user assistant system\n"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
    )


def write_checkpoint(
    out: Path, config_path: Path = HERE / "qwen3_moe", seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Builds and saves the model and tokenizer (atomically: a temp folder renamed at the end)."""
    config = AutoConfig.from_pretrained(config_path.parent if config_path.is_file() else config_path)
    tokenizer = build_tokenizer(config.vocab_size)
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", type=Path, default=HERE / "qwen3_moe", help="a folder holding config.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    print(f"wrote {write_checkpoint(args.out, args.config, args.seed, getattr(torch, args.dtype))}")


if __name__ == "__main__":
    main()

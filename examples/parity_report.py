"""Builds the bundled tiny MoE from its config, runs it with the routed experts on the CPU operator, and
prints a parity report against the same model in plain Hugging Face transformers.

    make demo                                  # or: .venv/bin/python examples/parity_report.py
    .venv/bin/python examples/parity_report.py --config path/to/config.json --tokens 256 --kernel portable
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import kt_core

HERE = Path(__file__).resolve().parent
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def swap_experts(model: torch.nn.Module, **kwargs) -> int:
    """Replaces every fused `*Experts` module by a KTExperts sharing its weights; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if name.endswith(".experts") and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, kt_core.KTExperts.from_module(module, **kwargs))
            swapped += 1
    return swapped


def forward_backward(model, input_ids):
    """Loss, logits and the gradients of every trainable parameter, plus the wall time."""
    model.zero_grad()
    start = time.perf_counter()
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    elapsed = time.perf_counter() - start
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads, elapsed


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def build(config, dtype, seed, kernel=None):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dtype).eval()
    return model, (swap_experts(model, kernel=kernel) if kernel else 0)


def errors(run, truth) -> list[tuple[str, float]]:
    """Relative errors of one run's loss, logits and gradients against another's."""
    loss, logits, grads, _ = run
    loss_t, logits_t, grads_t, _ = truth
    router = [n for n in grads_t if n.endswith("mlp.gate.weight")]
    return [
        ("loss", rel(loss, loss_t)),
        ("logits", rel(logits, logits_t)),
        ("grad embed_tokens", rel(grads["model.embed_tokens.weight"], grads_t["model.embed_tokens.weight"])),
        ("grad routers (dw path)", max(rel(grads[n], grads_t[n]) for n in router)),
        ("grad all non-expert params", max(rel(grads[n], grads_t[n]) for n in grads if n in grads_t)),
    ]


def report(config_path: Path, dtype: torch.dtype, tokens: int, kernel: str, seed: int) -> bool:
    """fp32: ours against HF (tolerance 1e-5). bf16: ours and HF's own bf16 run, both against the fp32
    truth; ours passes when it is as close to the truth as HF's bf16 (within 1.5x, or the 1e-2 tolerance)."""
    config = AutoConfig.from_pretrained(config_path.parent)
    config._experts_implementation = "eager"  # Hugging Face's reference loop
    input_ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    truth = forward_backward(build(config, torch.float32, seed)[0], input_ids)
    hf = truth if dtype == torch.float32 else forward_backward(build(config, dtype, seed)[0], input_ids)
    ours_model, swapped = build(config, dtype, seed, kernel=kernel)
    ours = forward_backward(ours_model, input_ids)

    tol = TOLERANCE[dtype]
    kernel_used = ours_model.model.layers[0].mlp.experts.kernel
    print(
        f"\n{config.model_type} from {config_path.relative_to(HERE.parent)}  dtype={str(dtype)[6:]}  "
        f"tokens={tokens}  experts layers on CPU={swapped}  kernel={kernel_used}"
    )
    ok = True
    if dtype == torch.float32:
        print(f"  {'quantity':30s} {'ours vs HF':>12s}  (tolerance {tol:g})")
        for name, err in errors(ours, truth):
            ok &= err < tol
            print(f"  {name:30s} {err:12.2e}  {'ok' if err < tol else 'MISMATCH'}")
    else:
        print(f"  {'quantity':30s} {'ours vs fp32':>12s} {'HF bf16 vs fp32':>16s}")
        for (name, err), (_, hf_err) in zip(errors(ours, truth), errors(hf, truth), strict=True):
            good = err < max(tol, 1.5 * hf_err)
            ok &= good
            print(f"  {name:30s} {err:12.2e} {hf_err:16.2e}  {'ok' if good else 'MISMATCH'}")
    print(
        f"  loss {ours[0].item():.5f} (HF {hf[0].item():.5f}); forward+backward {ours[3] * 1e3:.0f} ms "
        f"(HF eager experts {hf[3] * 1e3:.0f} ms)"
    )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=HERE / "tiny_moe" / "qwen3_moe" / "config.json")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--kernel", default="auto", help=f"one of: auto, {', '.join(kt_core.available_kernels())}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"kt_core kernels on this CPU: {', '.join(kt_core.available_kernels())}")
    results = [
        report(args.config.resolve(), dt, args.tokens, args.kernel, args.seed) for dt in (torch.float32, torch.bfloat16)
    ]
    print("\nparity: " + ("PASS" if all(results) else "FAIL"))
    raise SystemExit(0 if all(results) else 1)


if __name__ == "__main__":
    main()

"""The projection tool (`python -m kt_core.plan`): model shapes, the planner's split, memory, the command line."""

from __future__ import annotations

import dataclasses

import pytest

from kt_core.plan import MACHINES, MODELS, project
from kt_core.plan.__main__ import main


@pytest.mark.parametrize(
    ("model", "published_billions"),
    [("deepseek-v3", 671), ("kimi-k2", 1026), ("qwen3-235b-a22b", 235), ("qwen3-30b-a3b", 30.5),
     ("deepseek-v2-lite", 15.7)],
)  # fmt: skip
def test_model_shapes_add_up_to_the_published_sizes(model, published_billions):
    assert MODELS[model].total_params() / 1e9 == pytest.approx(published_billions, rel=0.01)


def test_matches_the_measured_trainer_run_on_the_gpu_machine():
    """benchmarks/RESULTS.md 2026-12-03: DeepSeek-V2-Lite, 16 x 2048 tokens, streamed through the stock Trainer,
    14,030 tok/s on the H200 machine (its figures feed the cost model)."""
    p = project(MODELS["deepseek-v2-lite"], MACHINES["h200-16c"], tokens_per_step=16 * 2048)
    assert p.tokens_per_s == pytest.approx(14_030, rel=0.15)
    assert not p.problems and p.slot_capacity == 64


# benchmarks/RESULTS.md: DeepSeek-V3 at full width (its 3 dense layers + 2 or 4 MoE layers) through the stock Trainer,
# LoRA r=8, sequences of 2,048, step seconds measured. (layers, tokens per step, expert dtype, expert_gpu_memory GiB,
# machine, step s): H200 machine 2026-12-04, H100 machine 2026-12-06 (FP8 streamed as FP8, multiplied from e4m3).
FULL_WIDTH_RUNS = [
    (5, 8192, "fp8", 0, "h200-16c", 15.54),  # every expert on the CPU
    (5, 8192, "bf16", 24, "h200-16c", 5.58),  # 146 of 256 streamed, the rest on the CPU at the same time
    (5, 2048, "fp8", 0, "h100-16c", 4.64),
    (5, 2048, "fp8", 24, "h100-16c", 0.883),
    (7, 8192, "fp8", 24, "h100-16c", 2.343),  # each layer but the last two copied twice a step
    (7, 32768, "fp8", 24, "h100-16c", 4.043),
    (5, 8192, "fp8", 8, "h100-16c", 7.116),  # 97 streamed, 61% of the slots on the CPU
]


@pytest.mark.parametrize(("layers", "tokens", "dtype", "gib", "machine", "measured_s"), FULL_WIDTH_RUNS)
def test_matches_the_measured_full_width_deepseek_v3_runs(layers, tokens, dtype, gib, machine, measured_s):
    """Within 15% of each run above. Their CPU and FP8 GPU speeds feed the machine table (kt_core/plan/machines.py);
    the pass counts are the training step's (frozen base weights: no weight gradient). The runs it misses by more
    (two MoE layers at 8,192 and 32,768 tokens, the 4-layer run at 2,048, the 20 GiB split at 32,768) are in
    RESULTS.md with why."""
    model = dataclasses.replace(MODELS["deepseek-v3"], layers=layers)
    p = project(model, MACHINES[machine], tokens_per_step=tokens, expert_dtype=dtype, expert_gpu_memory=gib * 2**30)
    assert not p.problems
    assert (p.experts_streamed == 0) == (gib == 0)
    assert p.step_s == pytest.approx(measured_s, rel=0.15)


def test_projects_the_streamed_split_that_the_runtime_chose():
    """The bf16 split of 2026-12-04 streamed 146 experts a layer at 24 GiB; FP8 slots of 24 GiB hold all 256."""
    five = dataclasses.replace(MODELS["deepseek-v3"], layers=5)
    mixed = project(five, MACHINES["h200-16c"], tokens_per_step=8192, expert_gpu_memory=24 * 2**30)
    assert mixed.experts_streamed == 146
    fp8 = project(five, MACHINES["h100-16c"], tokens_per_step=2048, expert_dtype="fp8", expert_gpu_memory=24 * 2**30)
    assert fp8.slot_capacity == 256


def test_all_cpu_runs_at_the_measured_all_cpu_speed():
    from kt_core.plan.machines import ALL_CPU_SPEED

    five = dataclasses.replace(MODELS["deepseek-v3"], layers=5)
    machine = MACHINES["h100-16c"]
    on_cpu = project(five, machine, tokens_per_step=8192, expert_dtype="fp8", expert_gpu_memory=0)
    slots = 8192 * five.experts_per_token
    flops = 4 * 2 * 3 * five.hidden * five.expert_intermediate * slots  # as the planner counts
    assert on_cpu.plan.cpu_s == pytest.approx(flops / (machine.cpu_flops * ALL_CPU_SPEED), rel=0.02)


def test_the_last_two_layers_of_the_forward_are_copied_once():
    """Two slots: the layers the forward streams last are still there for their backward. On a machine where the
    copies are everything (slow PCIe, no CPU to share with), a model of two MoE layers copies each once a step, one
    of four MoE layers six layers' worth, one of 58 MoE layers 114 (the measured 62 GB a step of the 4-MoE-layer
    run, RESULTS.md 2026-12-06, is six copies of its 235 streamed FP8 experts)."""
    machine = dataclasses.replace(MACHINES["h100-16c"], pcie_bytes_per_s=1e8, cpu_flops=1.0)
    for layers, copies in ((5, 2), (7, 6), (61, 114)):
        model = dataclasses.replace(MODELS["deepseek-v3"], layers=layers)
        p = project(model, machine, tokens_per_step=8192, expert_dtype="fp8", expert_gpu_memory=24 * 2**30)
        assert p.experts_streamed == 256
        one_copy = p.plan.pcie_s / 2  # the plan counts a layer's two copies
        assert p.step_s == pytest.approx(copies * one_copy, rel=0.01), layers


def test_fp8_gpu_speed_follows_the_rows_per_expert():
    from kt_core.plan.machines import fp8_gpu_speed

    assert fp8_gpu_speed(64) == pytest.approx(100 / 300, rel=0.2)  # the measured in-step speeds, 2026-12-06
    assert fp8_gpu_speed(256) == pytest.approx(228 / 300, rel=0.05)
    assert fp8_gpu_speed(1024) == pytest.approx(290 / 300, rel=0.1)
    assert fp8_gpu_speed(64) < fp8_gpu_speed(256) < fp8_gpu_speed(1024)


def test_faster_parts_never_make_it_slower():
    model, base = MODELS["deepseek-v3"], MACHINES["kt-2x4090-8488c"]
    before = project(model, base, tokens_per_step=8192).tokens_per_s
    for change in ({"pcie_bytes_per_s": 2 * base.pcie_bytes_per_s}, {"cpu_flops": 2 * base.cpu_flops},
                   {"gpu_flops": 2 * base.gpu_flops}, {"gpu_bytes": 2 * base.gpu_bytes}):  # fmt: skip
        assert project(model, dataclasses.replace(base, **change), tokens_per_step=8192).tokens_per_s >= before


def test_splits_a_full_width_layer_between_cpu_and_pcie():
    p = project(MODELS["deepseek-v3"], MACHINES["kt-2x4090-8488c"], tokens_per_step=8192, expert_dtype="fp8")
    assert 0 < p.experts_streamed < 256 and p.plan.cpu_s > 0 and p.plan.pcie_s > 0  # both sides work
    assert p.slot_capacity == 256  # two 11 GB FP8 slots and the 0.5 GiB dequantization buffer fit a 48 GB card
    assert max(p.gpu_bytes) <= 48 * 2**30 and not p.problems


def test_what_does_not_fit_is_named():
    small = dataclasses.replace(MACHINES["kt-2x4090-8488c"], gpu_bytes=4 * 2**30)
    problems = project(MODELS["deepseek-v3"], small, tokens_per_step=32768).problems
    assert any(p.startswith("GPU: 4.0 GiB per GPU leaves no room for a streaming slot") for p in problems)
    kimi = project(MODELS["kimi-k2"], MACHINES["kt-2x4090-8488c"], tokens_per_step=8192)
    assert kimi.problems == [
        "host RAM: the routed experts take 1921.5 GiB in bf16 (once, + one layer while it packs), the machine has "
        "1536.0 GiB: store them in fp8 or int8, or use more RAM"
    ]
    fp8 = project(MODELS["kimi-k2"], MACHINES["kt-2x4090-8488c"], tokens_per_step=8192, expert_dtype="fp8")
    assert not fp8.problems  # 945 GiB of FP8 experts + one layer fit 1.5 TiB


def test_host_ram_holds_the_experts_once():
    """With every expert on the CPU the training run frees the weights once packed (pack_experts(release=True));
    where some stream, each layer streams from its packed copy once it has one and frees its weights
    (kt_core/streaming/tiles.py): the experts once, plus the layer that is packing."""
    model, machine = MODELS["kimi-k2"], MACHINES["kt-2x4090-8488c"]
    streamed = project(model, machine, tokens_per_step=8192, expert_dtype="fp8")
    on_cpu = project(model, machine, tokens_per_step=8192, expert_dtype="fp8", expert_gpu_memory=0)
    assert streamed.experts_streamed > 0 and on_cpu.experts_streamed == 0
    one_layer = on_cpu.host_bytes // model.moe_layers
    assert streamed.host_bytes == on_cpu.host_bytes + one_layer
    assert not on_cpu.problems  # 945 GiB of FP8 experts fit 1.5 TiB once
    bf16 = project(model, machine, tokens_per_step=8192, expert_gpu_memory=0).problems
    assert [p[:72] for p in bf16] == ["host RAM: the routed experts take 1890.0 GiB in bf16 (the packed copy), "]


def test_command_line(capsys):
    assert main(["--model", "qwen3-235b-a22b", "--gpus", "2x24GiB", "--pcie", "25GB/s", "--host-ram", "1.5TiB"]) == 0
    out = capsys.readouterr().out
    assert "qwen3-235b-a22b on kt-2x4090-8488c (changed: gpu_bytes, gpus, host_bytes, pcie_bytes_per_s)" in out
    assert main(["--model", "kimi-k2"]) == 1  # does not fit: exit status 1, the reason in the row
    assert main(["--gpus", "24GiB"]) == 2
    assert "--gpus: got '24GiB', expected COUNTxSIZE" in capsys.readouterr().err
    assert main(["--model", "deepseek-v3", "--machine", "h200-16c", "--expert-gpu-memory", "24GiB"]) == 1
    assert "| 146 of 256 |" in capsys.readouterr().out  # 2 x 146 bf16 experts in 24 GiB; 61 layers fit no 125 GiB
    assert main(["--table", "--tokens-per-step", "4096"]) == 0
    assert capsys.readouterr().out.count("\n| ") == len(MODELS) * len(MACHINES) * 2  # rows after the header

"""The GPU memory plan (kt_core/streaming/memory_plan.py): each part against bytes computed by hand, the refusal
and its numbers, and the refusal through KTCallback and LLaMA-Factory's argument parsing, before any streaming
allocation. No GPU here: the device is named "cuda:0" and the free memory is given."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import replace

import pytest
import torch

from kt_core.loading import MemoryPlanError
from kt_core.streaming import memory_plan as mp
from kt_core.streaming.planner import allocator_margin
from tests.tiny_models import build_tiny_model, tiny_config

GiB = 2**30

# A tiny MoE shape: H 32, V 64, 4 heads, E 4, top-2, I 16, fp32 expert stores, two MoE layers whose attention
# linears take 224 = (32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) elements per token (tiny qwen3_moe).
TINY = mp.ModelDims(
    hidden=32,
    vocab=64,
    heads=4,
    layers=(mp.LayerDims(linear=224, widest=32, moe=True),) * 2,
    experts=4,
    top_k=2,
    expert_intermediate=16,
    expert_item=4,
    expert_lora_rank=2,
    moe_layers=2,
)
EXPERT = 3 * 32 * 16 * 4  # one expert's weights: 6144 bytes
SLOT = 2 * EXPERT  # per expert of slot capacity (two slots)


def _tiny_inputs(*, checkpointing=True, budget=4 * SLOT + 2 * 2 * EXPERT, batch=3, seq=5) -> mp.PlanInputs:
    """batch 3 x seq 5 (odd sizes), bf16; a budget of full-layer slots plus two residents per layer."""
    run = mp.RunShape(batch=batch, seq_len=seq, gradient_checkpointing=checkpointing, loss_backend="chunked")
    streaming = mp.StreamingSizes(expert_gpu_memory=budget, keep_bytes="1KiB")
    return mp.PlanInputs(TINY, run, weights_bytes=1000, trainable_bytes=100, streaming=streaming)


def _hand_parts(checkpointing: bool) -> dict[str, int]:
    T, d, H, E, K, I = 15, 2, 32, 4, 2, 16
    factors = E * 2 * (2 * H + 3 * I)  # expert-LoRA elements of a layer: 896
    saved = T * (d * 224 + 4 * 4 + 8 * E + 12 * K + (d + 4) * H) + factors * d  # 12472
    pieces = T * K  # 30 slots: one piece
    transient = T * 2 * d * 32 + T * 4 * H + 2 * pieces * (2 * H + 3 * I) * d + 40 * T * K + factors * 4  # 22064
    loss = (4 + 2 * d) * T * 64 + 4 * T + 3 * d * T * H  # chunked: one chunk of all 15 tokens' logits
    return {
        "non-expert weights": 1000,
        "trainable state": 100 * 3,  # gradients + two Adam states
        "expert LoRA on the GPU": 2 * factors * 4 * 4,  # fp32 factors, gradients, two Adam states, 2 layers
        "streaming slots": 4 * SLOT,
        "packed-copy staging": 0,  # fp32 experts: no packed copy streams in their place
        "resident experts": 2 * 2 * EXPERT,  # what the budget leaves: 2 per layer
        "layer inputs": 3 * T * H * d if checkpointing else 2 * saved,
        "one layer's working set": saved + transient if checkpointing else transient,
        "kept expert intermediates": min(1024, T * K * 2 * I * d) if checkpointing else 0,
        "loss workspace": loss,
    }


@pytest.mark.parametrize("checkpointing", [True, False])
def test_each_part_equals_the_bytes_computed_by_hand(checkpointing):
    plan = mp.plan_gpu_memory(_tiny_inputs(checkpointing=checkpointing), limit=GiB)
    want = _hand_parts(checkpointing)
    assert plan.parts == want
    transient = max(want["loss workspace"], want["one layer's working set"] + want["kept expert intermediates"])
    static = sum(
        want[k]
        for k in want
        if k not in ("layer inputs", "one layer's working set", "kept expert intermediates", "loss workspace")
    )
    assert plan.peak == static + want["layer inputs"] + transient
    assert (plan.capacity, plan.residents, plan.elastic_residents) == (4, 2, False)
    assert plan.expert_lora_on_gpu
    assert plan.limit_source == "the free memory CUDA reports" and plan.fits
    plan.check()  # fits: no error


def test_expert_lora_goes_to_the_gpu_only_where_it_fits():
    """Factors, gradients and optimizer states on the GPU when they fit beside the rest (before residents); else
    host memory (no part, no refusal); never with mode "cpu" or when told not to."""
    inputs = _tiny_inputs(budget=4 * SLOT)  # slots only: the factors' room is not taken by residents
    state = mp.expert_lora_state_bytes(TINY, optimizer_states=2)
    assert state == 2 * 4 * 2 * (2 * 32 + 3 * 16) * 4 * 4
    with_them = mp.plan_gpu_memory(inputs, limit=GiB)
    assert with_them.expert_lora_on_gpu and with_them.parts["expert LoRA on the GPU"] == state
    forced = replace(inputs, streaming=replace(inputs.streaming, expert_lora_on_gpu=True))
    lo, hi = 1, GiB  # the smallest limit the plan with them on the GPU fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if mp.plan_gpu_memory(forced, mid).fits else (mid + 1, hi)
    tight = mp.plan_gpu_memory(inputs, lo - 1)
    assert not tight.expert_lora_on_gpu and tight.parts["expert LoRA on the GPU"] == 0 and tight.fits
    assert tight.peak == with_them.peak - state
    refused = mp.plan_gpu_memory(forced, lo - 1)
    assert refused.expert_lora_on_gpu and not refused.fits
    for streaming in (replace(inputs.streaming, expert_lora_on_gpu=False), replace(inputs.streaming, mode="cpu")):
        plan = mp.plan_gpu_memory(replace(inputs, streaming=streaming), limit=GiB)
        assert not plan.expert_lora_on_gpu and plan.parts["expert LoRA on the GPU"] == 0
    sgd = mp.plan_gpu_memory(replace(inputs, optimizer_states=0), limit=GiB)
    assert sgd.parts["expert LoRA on the GPU"] == state // 2  # factors and gradients only


def test_checkpointing_trades_every_layer_s_activations_for_its_input():
    on = mp.plan_gpu_memory(_tiny_inputs(checkpointing=True), limit=GiB).parts
    off = mp.plan_gpu_memory(_tiny_inputs(checkpointing=False), limit=GiB).parts
    T, H, d = 15, 32, 2
    assert on["layer inputs"] == (len(TINY.layers) + 1) * T * H * d
    saved = off["layer inputs"] // len(TINY.layers)
    assert on["one layer's working set"] == saved + off["one layer's working set"]
    assert off["kept expert intermediates"] == 0 < on["kept expert intermediates"]

    def saved_by_all_layers(batch: int) -> int:  # without streaming: no per-layer copy of the expert LoRA
        run = mp.RunShape(batch=batch, seq_len=5, gradient_checkpointing=False, loss_backend="chunked")
        return mp.plan_gpu_memory(mp.PlanInputs(TINY, run, weights_bytes=0), limit=GiB).parts["layer inputs"]

    assert saved_by_all_layers(6) == 2 * saved_by_all_layers(3)  # grows with the tokens, batch x sequence


def test_odd_sizes_and_int8_slots():
    # A budget that is not a multiple of anything: the slots take whole experts, the rest is left unused.
    plan = mp.plan_gpu_memory(_tiny_inputs(budget=3 * SLOT + 7), limit=GiB)
    assert (plan.capacity, plan.residents) == (3, 0)
    assert plan.parts["streaming slots"] == 3 * SLOT and plan.parts["resident experts"] == 0
    assert plan.parts["kept expert intermediates"] == 0  # slots of 3 of 4 experts: the split path keeps nothing
    int8 = mp.StreamingSizes(expert_gpu_memory=10**9, quantize="int8")
    plan = mp.plan_gpu_memory(replace(_tiny_inputs(), streaming=int8), limit=GiB)
    q = 3 * 32 * 16 + 4 * (2 * 16 + 32)  # int8 weights and fp32 row scales of one expert
    assert plan.parts["streaming slots"] == 4 * (2 * q + EXPERT)  # two int8 slots and the bf16 scratch
    unknown = mp.plan_gpu_memory(replace(_tiny_inputs(), run=mp.RunShape(batch=3, seq_len=None)), limit=GiB)
    assert unknown.parts["layer inputs"] == unknown.parts["loss workspace"] == 0
    assert "not planned" in unknown.table()


def test_residents_are_fitted_under_a_gpu_memory_limit():
    inputs = _tiny_inputs(budget=4 * SLOT + 4 * 2 * EXPERT)  # room for every expert resident
    roomy = mp.plan_gpu_memory(inputs, GiB)
    assert roomy.elastic_residents and roomy.residents == 4
    without = mp.plan_gpu_memory(replace(inputs, streaming=replace(inputs.streaming, expert_gpu_memory=4 * SLOT)), GiB)
    limit = without.peak + allocator_margin(2**28) + 2 * EXPERT + 5  # one resident per layer fits beside the rest
    tight = mp.plan_gpu_memory(inputs, limit)
    assert tight.residents == 1 and tight.parts["resident experts"] == 2 * EXPERT and tight.fits


# A larger shape, for numbers a user would see: 32 MoE layers, H 4096, E 64, top-8, I 1024, bf16.
BIG = mp.ModelDims(
    hidden=4096,
    vocab=32000,
    heads=32,
    layers=(mp.LayerDims(linear=4 * 2 * 4096, widest=4096, moe=True),) * 32,
    experts=64,
    top_k=8,
    expert_intermediate=1024,
    moe_layers=32,
)


def _big(limit="19GiB", batch=8, seq=4096):
    run = mp.RunShape(batch=batch, seq_len=seq, loss_backend="liger")
    inputs = mp.PlanInputs(
        BIG, run, weights_bytes=3 * GiB, trainable_bytes=2**26, streaming=mp.StreamingSizes(expert_gpu_memory="12GiB")
    )
    return mp.plan_gpu_memory(inputs, limit)


def test_refusal_names_the_knob_and_the_number():
    plan = _big()
    assert not plan.fits
    knobs = mp.Knobs(
        limit="kt_gpu_memory_limit",
        seq_len="cutoff_len",
        experts="kt_expert_gpu_memory",
        keep="kt_stream_keep_bytes",
    )
    with pytest.raises(MemoryPlanError) as refused:
        plan.check(knobs)
    message = str(refused.value)
    assert f"needs {mp.format_bytes(plan.peak)}" in message and "kt_gpu_memory_limit is 19.00 GiB" in message
    gib = int(re.search(r"Raise kt_gpu_memory_limit to >= (\d+)GiB", message).group(1))
    assert _big(f"{gib}GiB").fits and not _big(f"{gib - 1}GiB").fits
    batch = int(re.search(r"per_device_train_batch_size to <= (\d+)", message).group(1))
    assert _big(batch=batch).fits and not _big(batch=batch + 1).fits
    seq = int(re.search(r"cutoff_len to <= (\d+)", message).group(1))
    assert _big(seq=seq).fits and not _big(seq=seq + 1).fits
    mib = int(re.search(r"kt_expert_gpu_memory to <= (\d+)MiB", message).group(1))
    lowered = mp.plan_gpu_memory(
        replace(plan.inputs, streaming=mp.StreamingSizes(expert_gpu_memory=mib * 2**20)), "19GiB"
    )
    assert lowered.fits
    assert "kt_stream_keep_bytes" in message and plan.table() in message


def test_without_a_limit_the_free_memory_is_the_limit(monkeypatch):
    monkeypatch.setattr(mp, "usable_gpu_bytes", lambda device: 20 * GiB)
    plan = _big(limit=None)
    assert plan.limit == 20 * GiB and plan.limit_source == "the free memory CUDA reports"
    with pytest.raises(
        MemoryPlanError,
        match=r"CUDA reports is 20.00 GiB\. Free GPU memory, or use a larger GPU \(the run needs >= 31GiB\)",
    ):
        plan.check()
    monkeypatch.setattr(mp, "usable_gpu_bytes", lambda device: None)  # no CUDA: nothing to check against
    assert _big(limit=None).fits


def test_an_estimate_just_over_the_free_memory_only_warns(monkeypatch, caplog):
    # (a gpu_memory_limit given is enforced to the byte: test_refusal_names_the_knob_and_the_number)
    needs = _big(limit=None)
    need = needs.peak + mp.allocator_margin(needs.peak)
    monkeypatch.setattr(mp, "usable_gpu_bytes", lambda device: int(need / 1.05))  # 5% short: within the estimate
    plan = _big(limit=None)
    assert not plan.fits
    with caplog.at_level("WARNING", logger=mp.logger.name):
        plan.check()  # goes on
    assert "within the estimate's error, so the run goes on" in caplog.text
    monkeypatch.setattr(mp, "usable_gpu_bytes", lambda device: int(need / 1.2))  # 20% short: refused
    with pytest.raises(MemoryPlanError):
        _big(limit=None).check()


def test_model_dims_of_a_tiny_model():
    dims = mp.model_dims(build_tiny_model("deepseek_v3", num_layers=3))
    # layer 0 dense (MLP 32 -> 48 -> 32), layers 1-2 MoE with one shared expert (16); MLA attention:
    # q_a 32->16, q_b 16->4*16, kv_a 32->16+8, kv_b 16->4*(8+8), o 4*8->32
    attention = (32 + 16) + (16 + 64) + (32 + 24) + (16 + 64) + (32 + 32)
    assert [x.linear for x in dims.layers] == [attention + 3 * (32 + 48)] + [attention + 3 * (32 + 16)] * 2
    assert [x.moe for x in dims.layers] == [False, True, True]
    assert (dims.experts, dims.top_k, dims.expert_intermediate, dims.moe_layers) == (4, 2, 16, 2)
    qwen = mp.model_dims(
        build_tiny_model("qwen3_moe", num_layers=2), lora_targets=["q_proj", "o_proj"], lora_dropout=0.1
    )
    assert [x.lora_inputs for x in qwen.layers] == [32 + 32, 32 + 32]  # dropout copies the inputs of q and o


def test_optimizer_states_and_loss_backend():
    assert mp.optimizer_states("adamw_torch_fused") == 2 and mp.optimizer_states("sgd") == 0
    assert mp.optimizer_states("adafactor") == 0 and mp.optimizer_states("lion_32bit") == 1
    assert mp.loss_backend("auto", "cpu") == "chunked" and mp.loss_backend("cce", "cuda:0") == "cce"


# ---- through the front ends -------------------------------------------------------------------------------------


def test_kt_callback_refuses_before_streaming_allocates(monkeypatch, tmp_path):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import peft

    import kt_core
    from kt_plugins.hf_trainer import KTCallback
    from kt_plugins.hf_trainer import callback as callback_module
    from tests.tiny_models import token_dataset, trainer_args

    model = peft.get_peft_model(
        build_tiny_model("qwen3_moe", num_layers=2).train(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]),
    )
    with monkeypatch.context() as cuda:  # KTCallback(expert_gpu_memory=...) asks for a CUDA GPU when built
        cuda.setattr(torch.cuda, "is_available", lambda: True)
        callback = KTCallback(expert_gpu_memory="1GiB", gpu_memory_limit="1MiB", max_seq_length=64)
    # The model computes on "cuda:0" and every tensor the plan counts is there; streaming must never start.
    monkeypatch.setattr(callback_module, "_model_device", lambda m: torch.device("cuda:0"))
    monkeypatch.setattr(callback_module, "_on_device", lambda t, device: True)
    monkeypatch.setattr(kt_core, "enable_streaming", lambda *a, **k: pytest.fail("streaming allocated"))
    args = trainer_args(tmp_path, max_steps=1)
    with pytest.raises(MemoryPlanError, match=r"Raise KTCallback\(gpu_memory_limit\) to >= 1GiB"):
        transformers.Trainer(model=model, args=args, train_dataset=token_dataset(8), callbacks=[callback])
    assert mp.last_plan().inputs.run.tokens == 4 * 64  # per_device_train_batch_size x max_seq_length


def test_kt_callback_logs_a_plan_that_fits(monkeypatch, tmp_path, caplog):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from kt_plugins.hf_trainer import KTCallback
    from kt_plugins.hf_trainer import callback as callback_module
    from tests.tiny_models import token_dataset, trainer_args

    monkeypatch.setattr(callback_module, "_model_device", lambda m: torch.device("cuda:0"))
    monkeypatch.setattr(callback_module, "_on_device", lambda t, device: True)
    monkeypatch.setattr(mp, "usable_gpu_bytes", lambda device: 80 * GiB)
    callback = KTCallback()  # no max_seq_length: the plan leaves activations out and says so
    with caplog.at_level("INFO", logger="kt_plugins.hf_trainer.callback"):
        transformers.Trainer(
            model=build_tiny_model("qwen3_moe", num_layers=2).train(),
            args=trainer_args(tmp_path, max_steps=1),
            train_dataset=token_dataset(8),
            callbacks=[callback],
        )
    assert callback.memory_plan is mp.last_plan() and callback.memory_plan.fits
    assert "GPU memory plan, cuda:0" in caplog.text and "not planned" in caplog.text


@pytest.mark.skipif(importlib.util.find_spec("llamafactory") is None, reason="needs LLaMA-Factory")
def test_llamafactory_arguments_are_refused_before_loading(monkeypatch, tmp_path):
    """The parser takeover plans from config.json alone (no weights exist here) and refuses by key."""
    import llamafactory.hparams.parser as parser

    from kt_plugins.llamafactory.takeover import patch_parser

    tiny_config("qwen3_moe", num_layers=2).save_pretrained(tmp_path / "model")
    monkeypatch.setenv("DISABLE_VERSION_CHECK", "1")
    monkeypatch.setenv("KT_LLAMAFACTORY_SKIP_VERSION_CHECK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # kt_expert_gpu_memory needs a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    patch_parser(parser)
    config = dict(
        model_name_or_path=str(tmp_path / "model"),
        stage="sft",
        do_train=True,
        finetuning_type="lora",
        lora_target="all",
        dataset="kt_identity",
        template="qwen3_nothink",
        cutoff_len=333,
        per_device_train_batch_size=3,
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,  # the Trainer's own device: no CUDA call while parsing
        use_kt=True,
        kt_expert_gpu_memory="1MiB",
        kt_gpu_memory_limit="2MiB",
    )
    with pytest.raises(MemoryPlanError, match=r"Raise kt_gpu_memory_limit to >= 1GiB"):
        parser._parse_train_args(config)
    plan = mp.last_plan()
    assert plan.inputs.run.tokens == 3 * 333 and plan.inputs.device == "cuda:0"
    assert plan.parts["non-expert weights"] > 0 and plan.parts["trainable state"] > 0  # LoRA on attention

"""FP8 experts (`load_model(..., expert_dtype="fp8")`) in the node's shared expert file: the e4m3 weights and their
fp32 block scales live once per node, every rank's KTExperts views them, and training gives the one-process curve.

Two ways: one process loading as local rank 0 and then as local rank 1 of two (the file written, then mapped), and
two gloo ranks under `python -m torch.distributed.run` training a few steps against one process at the same global
batch (this file is the worker script, __main__ below). kt_core/distributed/shared_store.py has the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from pathlib import Path

import pytest
import torch

from tests.distributed_helpers import launch

WEIGHTS = ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv")
STEPS = 3
GLOBAL_BATCH = 4
PAGE = 4096

pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type")


def _fp8_checkpoint(path: Path) -> Path:
    from tests.test_fp8_experts import write_fp8_deepseek

    return write_fp8_deepseek(path)  # block (16, 16), I = 24: partial scale blocks


def _backing(t: torch.Tensor) -> tuple[str, str, int]:
    """(inode, file, offset in the file) of the memory holding `t`'s first byte, from /proc/self/maps."""
    return backing_of(t.data_ptr())


def backing_of(ptr: int) -> tuple[str, str, int]:
    """(inode, file, offset in the file) of the memory at address `ptr`, from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            if lo <= ptr < hi:
                name = head[5].strip() if len(head) > 5 else ""
                return head[4], name.removesuffix(" (deleted)"), int(head[2], 16) + ptr - lo
    raise AssertionError(f"no mapping holds {ptr:#x}")


def _expert_layers(model) -> dict:
    from kt_core.experts import KTExperts

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, KTExperts)}


def _bytes_digest(model) -> str:
    h = hashlib.sha256()
    for name, m in sorted(_expert_layers(model).items()):
        for w in WEIGHTS:
            h.update(name.encode() + w.encode())
            h.update(getattr(m, w).detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _counting_reads():
    from kt_core.loading.checkpoint import Checkpoint

    reads: list[str] = []
    original = Checkpoint.get

    def get(self, key):
        reads.append(key)
        return original(self, key)

    return reads, original, get


# ---- one process, as local rank 0 and then local rank 1 ---------------------------------------------------------


def test_both_local_ranks_view_one_file_of_fp8_weights_and_scales(tmp_path, monkeypatch):
    """Local rank 0 writes the e4m3 weights and their scales into the file; local rank 1 reads nothing from the
    checkpoint and views the same bytes at the same offsets (a write through one view shows in the other); both
    equal the one-process FP8 load, bit for bit, and compute its logits."""
    from kt_core.distributed import cpus
    from kt_core.loading import load_model
    from kt_core.loading.checkpoint import Checkpoint

    checkpoint = _fp8_checkpoint(tmp_path / "ckpt")
    alone = load_model(checkpoint, device="cpu", progress=False, expert_dtype="fp8")
    monkeypatch.setattr(cpus, "_claimed", True)  # this test process keeps its CPUs
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", uuid.uuid4().hex)
    models, reads = [], []
    for rank in range(2):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        counted, _, get = _counting_reads()
        with monkeypatch.context() as m:
            m.setattr(Checkpoint, "get", get)
            models.append(
                load_model(checkpoint, device="cpu", progress=False, expert_dtype="fp8", shared_experts=tmp_path)
            )
        reads.append([k for k in counted if ".experts." in k])
    assert reads[0] and any(k.endswith("_scale_inv") for k in reads[0]) and reads[1] == []

    layers = [_expert_layers(m) for m in models]
    assert layers[0].keys() == layers[1].keys() == _expert_layers(alone).keys() and len(layers[0]) == 2
    backings = [{(n, w): _backing(getattr(m, w)) for n, m in ls.items() for w in WEIGHTS} for ls in layers]
    assert backings[0] == backings[1]  # same file (inode), same offsets
    (inode, name), *others = {b[:2] for b in backings[0].values()}
    assert not others and inode != "0" and Path(name).parent == tmp_path and name.endswith(".bin")
    offsets = sorted(b[2] for b in backings[0].values())
    assert len(set(offsets)) == len(offsets) and all(o % PAGE == 0 for o in offsets)  # each tensor on its own page
    for n, m in layers[1].items():
        assert m.is_fp8 and m.gate_up_proj_scale_inv.dtype == torch.float32
        for w in WEIGHTS:
            ours, theirs = getattr(m, w), getattr(_expert_layers(alone)[n], w)
            assert ours.shape == theirs.shape and torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)), w
    assert _bytes_digest(models[0]) == _bytes_digest(models[1]) == _bytes_digest(alone)

    # One memory: a scale written through rank 0's view is what rank 1 reads.
    a = next(iter(layers[0].values())).down_proj_scale_inv
    b = next(iter(layers[1].values())).down_proj_scale_inv
    kept = a[0, 0, 0].item()
    with torch.no_grad():
        a[0, 0, 0] = 1234.5
        assert b[0, 0, 0].item() == 1234.5
        a[0, 0, 0] = kept

    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = alone(ids).logits
        for m in models:
            torch.testing.assert_close(m(ids).logits, want, rtol=0, atol=0)


# ---- two gloo ranks training ------------------------------------------------------------------------------------


def _run(checkpoint: Path, out: Path, *, ranks: int, amx: bool) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    launch(__file__, [checkpoint, out], ranks=ranks, env={"KT_AMX_EMULATE": "1"} if amx else {"KT_KERNEL": "avx2"})
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.parametrize("amx", [False, True], ids=["unpacked", "amx"])
def test_two_ranks_share_fp8_experts_and_train_the_one_process_curve(tmp_path, amx):
    """amx: the packed kernel (AMX, or its scalar model: KT_AMX_EMULATE=1), whose packed copy of the FP8 experts is
    shared too (kt_core/distributed/shared_packs.py); else an unpacked kernel (avx2), which packs nothing."""
    from kt_core import kernels

    if not amx and "avx2" not in kernels.fp8_kernels():
        pytest.skip("the unpacked avx2 kernel does not run here")
    checkpoint = _fp8_checkpoint(tmp_path / "ckpt")
    (one,) = _run(checkpoint, tmp_path / "one", ranks=1, amx=amx)
    ranks = _run(checkpoint, tmp_path / "two", ranks=2, amx=amx)
    assert {r["kernel"] for r in [one, *ranks]} == {"amx_bf16" if amx else "avx2"}
    if amx:  # one packed copy: local rank 0 packed it into a second file, both ranks' tiles are that file's
        assert one["packs"] == [1, 1] and ranks[0]["packs"] == [1, 1] and ranks[1]["packs"] == [0, 0]
        assert ranks[0]["tiles"] == ranks[1]["tiles"] and len(ranks[0]["tiles"]) == 2 * 2
        (packed_file,) = {t[1] for t in ranks[0]["tiles"]}
        assert packed_file.startswith("/dev/shm/kt-experts-") and packed_file != ranks[0]["files"][0]
        for r in ranks:
            assert r["tiles_rss_kb"] > 0 and abs(2 * r["tiles_pss_kb"] - r["tiles_rss_kb"]) <= 8

    assert one["files"] == ["(private)"]  # one process: its own copy
    assert [r["expert_reads"] > 0 for r in ranks] == [True, False]
    assert ranks[0]["scale_reads"] > 0 and ranks[1]["scale_reads"] == 0
    # Weights and scales of every layer, on both ranks: one /dev/shm file, at the same offsets, before and after
    # training; removed once both ranks mapped it.
    assert ranks[0]["backings"] == ranks[1]["backings"] == ranks[0]["backings_after"] == ranks[1]["backings_after"]
    assert len(ranks[0]["backings"]) == 2 * len(WEIGHTS)
    assert ranks[0]["files"] == ranks[1]["files"] and len(ranks[0]["files"]) == 1
    assert ranks[0]["files"][0].startswith("/dev/shm/kt-experts-") and not Path(ranks[0]["files"][0]).exists()
    for r in ranks:  # both ranks hold the pages: each is charged half of them (proportional set size)
        assert r["rss_kb"] > 0 and abs(2 * r["pss_kb"] - r["rss_kb"]) <= 8
    # The frozen FP8 bytes and scales: the one-process load's, before and after the steps.
    assert {r["digest"] for r in ranks} | {r["digest_after"] for r in ranks} == {one["digest"]}
    assert one["digest_after"] == one["digest"]

    assert ranks[0]["reductions"] == STEPS and ranks[0]["broadcasts"] == 1
    assert ranks[0]["losses"] == ranks[1]["losses"]  # averaged over the ranks
    assert len(one["losses"]) == STEPS and one["losses"][-1] < one["losses"][0]  # it learns
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)


def _train(checkpoint: str, out: str) -> None:
    """One rank (or the only process): load the FP8 experts, train STEPS steps of expert and attention LoRA on its
    share of one fixed global batch, report where its expert tensors live and the loss averaged over the ranks."""
    import peft
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import kt_core
    from integration_tests.test_distributed_store import _mapping_of
    from kt_core.distributed import prepare_data_parallel
    from kt_core.loading.checkpoint import Checkpoint
    from kt_core.peft import take_over_peft_model

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    reads, original, get = _counting_reads()
    Checkpoint.get = get
    try:
        model = kt_core.load_model(checkpoint, device="cpu", progress=False, dtype=torch.float32, expert_dtype="fp8")
    finally:
        Checkpoint.get = original

    def backings(model) -> tuple[list, list]:
        found = {f"{n}.{w}": _backing(getattr(m, w)) for n, m in sorted(_expert_layers(model).items()) for w in WEIGHTS}
        shared = all(b[1].startswith("/dev/shm/") for b in found.values())
        files = sorted({b[1] for b in found.values()}) if shared else ["(private)"]
        return [[k, b[0], b[2]] for k, b in found.items()] if shared else [], files

    placed, files = backings(model)
    digest = _bytes_digest(model)  # reads every expert page
    layers = [m for _, m in sorted(_expert_layers(model).items())]
    ops = [m.operator() for m in layers]  # packed kernels: packed, or borrowing the node's packed copy
    tiles = {f"{i}.{name}": address for i, op in enumerate(ops) for name, address, _ in op.packed_blobs()}
    tiles = {name: address for name, address in tiles.items() if name.endswith(".data")}
    if world > 1:
        dist.barrier()  # both ranks have mapped and read every page: the proportional set sizes are settled
    _, _, rss, pss = _mapping_of(layers[0].gate_up_proj_scale_inv.data_ptr())
    _, _, tiles_rss, tiles_pss = _mapping_of(tiles["0.gate_up.data"]) if tiles else (None, None, 0, 0)

    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_a_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = take_over_peft_model(peft.get_peft_model(model, config)).train()
    gen = torch.Generator().manual_seed(1)  # every factor, the experts' included: the same values in every run
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    averager = prepare_data_parallel(model)
    net = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(3, 64, (GLOBAL_BATCH, 16), generator=torch.Generator().manual_seed(3))  # every step
    share = GLOBAL_BATCH // world
    losses = []
    for _ in range(STEPS):
        batch = ids[rank * share : (rank + 1) * share]
        loss = net(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
        losses.append(value.item() / world)
    placed_after, _ = backings(model)
    report = {
        "expert_reads": sum(".experts." in k for k in reads),
        "scale_reads": sum(".experts." in k and k.endswith("_scale_inv") for k in reads),
        "backings": placed,
        "backings_after": placed_after,
        "files": files,
        "rss_kb": rss,
        "pss_kb": pss,
        "kernel": layers[0].kernel,
        "packs": [op.pack_count for op in ops],
        "tiles": sorted(list(backing_of(address)) for address in tiles.values()),
        "tiles_rss_kb": tiles_rss,
        "tiles_pss_kb": tiles_pss,
        "digest": digest,
        "digest_after": _bytes_digest(model),
        "losses": losses,
        "reductions": averager.reductions,
        "broadcasts": averager.broadcasts,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":  # one process, or each torchrun worker
    _train(*sys.argv[1:3])


def test_ddp_ignores_the_fp8_block_scales():
    """The scales are frozen host tensors like the weights: DDP (which would broadcast them, and refuses host
    tensors beside cuda ones) must not own them."""
    from kt_core import KTExperts
    from kt_core.distributed import ignore_frozen_experts

    model = torch.nn.Module()
    model.experts = KTExperts(2, 32, 16, dtype=torch.float8_e4m3fn)
    ignored = ignore_frozen_experts(model, expert_lora=False)
    names = ["down_proj", "down_proj_scale_inv", "gate_up_proj", "gate_up_proj_scale_inv"]
    assert ignored == [f"experts.{n}" for n in names]
    model.bf16 = KTExperts(2, 32, 16, dtype=torch.bfloat16)  # no scales: nothing named that does not exist
    assert [n for n in ignore_frozen_experts(model, expert_lora=False) if n.startswith("bf16.")] == [
        "bf16.down_proj",
        "bf16.gate_up_proj",
    ]

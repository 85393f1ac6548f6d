"""The packed kernels' copy of the experts, once per node (kt_core/distributed/shared_packs.py): local rank 0 packs
every layer into a file beside the shared weights, and every rank's operators borrow their tiles from that file.

One process loads as local rank 0 and then as local rank 1 of two (the file written, then mapped), on the AMX
kernels (their scalar model where the CPU has no AMX: KT_AMX_EMULATE=1), bf16 and int8 (whose quantization errors
travel with the file); both equal a private load's logits bit for bit.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from tests.test_distributed_store_fp8 import PAGE, _backing, _expert_layers, backing_of

pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type")


@pytest.fixture(params=["amx_bf16", "amx_int8"])
def kernel(request, monkeypatch):
    from kt_core import kernels

    monkeypatch.setenv("KT_AMX_EMULATE", "1")  # native AMX where the CPU has it, else its scalar model
    if request.param not in {*kernels.available_kernels(), *kernels.quantized_kernels()}:
        pytest.skip(f"{request.param} does not run here")
    return request.param


def _tiles(layer) -> dict[str, int]:
    """{blob name: address} of the layer's operator's packed buffers."""
    return {name: address for name, address, _ in layer.operator().packed_blobs()}


def test_local_ranks_borrow_one_packed_copy(tmp_path, monkeypatch, kernel):
    from kt_core.distributed import cpus
    from kt_core.loading import load_model
    from tests.tiny_models import build_tiny_model, save_fused_checkpoint

    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=2, dtype=torch.bfloat16), tmp_path / "ckpt")
    alone = load_model(tmp_path / "ckpt", device="cpu", progress=False, kernel=kernel)  # one rank: its own pack
    monkeypatch.setattr(cpus, "_claimed", True)  # this test process keeps its CPUs
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", uuid.uuid4().hex)
    models = []
    for rank in range(2):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        models.append(
            load_model(tmp_path / "ckpt", device="cpu", progress=False, kernel=kernel, shared_experts=tmp_path)
        )

    private = _expert_layers(alone)
    layers = [_expert_layers(m) for m in models]
    assert layers[0].keys() == layers[1].keys() == private.keys() and len(private) == 2
    for name in private:
        ours = [ls[name].operator() for ls in layers]
        theirs = private[name].operator()
        assert theirs.pack_count == 1 and not theirs.packed_borrowed
        assert ours[0].pack_count == 1 and ours[1].pack_count == 0  # local rank 0 packed; rank 1 only mapped
        assert all(op.packed_borrowed for op in ours)
        assert ours[1].quantization_error == theirs.quantization_error  # int8: measured by rank 0, carried
        assert ours[0].packed_bytes == ours[1].packed_bytes == theirs.packed_bytes
    # Both ranks' tiles: one file beside the weights' (another inode), at the same offsets, each on its own page.
    tiles = [{(n, b): _tiles(ls[n])[b] for n in ls for b in ("gate_up.data", "down.data")} for ls in layers]
    backings = [{k: backing_of(address) for k, address in t.items()} for t in tiles]
    assert backings[0] == backings[1]
    (inode, name), *others = {b[:2] for b in backings[0].values()}
    assert not others and name.startswith(str(tmp_path)) and "kt-experts-" in name
    weights_file = _backing(next(iter(layers[0].values())).gate_up_proj)[:2]
    assert (inode, name) != weights_file
    assert all(b[2] % PAGE == 0 for b in backings[0].values())

    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = alone(ids).logits
        for m in models:
            torch.testing.assert_close(m(ids).logits, want, rtol=0, atol=0)

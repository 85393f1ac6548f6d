"""The on-disk cache of packed weights: reload instead of packing, same outputs, recovery, keys."""

from __future__ import annotations

import ctypes
import logging

import pytest
import torch

from kt_core import KTExperts, kernels
from kt_core.runtime import pack_cache

E, H, I, K, T = 4, 100, 70, 2, 9  # odd sizes: every packed dimension is padded
AVX512_PACKED = ("avx512_bf16_packed", "avx512_vnni_int8", "avx512_vnni_int4")
AMX_PACKED = ("amx_bf16", "amx_int8", "amx_int4")


def runnable() -> set[str]:
    return set(kernels.available_kernels()) | set(kernels.quantized_kernels())


@pytest.fixture(params=[*AVX512_PACKED, *AMX_PACKED])
def kernel(request, monkeypatch):
    name = request.param
    if name.startswith("amx") and name not in runnable():
        monkeypatch.setenv("KT_AMX_EMULATE", "1")  # the AMX tile code on its scalar model
    if name not in runnable():
        pytest.skip(f"{name} does not run here")
    return name


def weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(torch.bfloat16)
    return gate_up, down


def build(kernel: str, folder, seed: int = 0, **kwargs) -> KTExperts:
    layer = KTExperts.from_tensors(*weights(seed), kernel=kernel, pack_cache=folder, **kwargs)
    layer.operator()
    return layer


def forward(layer: KTExperts) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    return kernels.experts_forward(layer, x, ids, w)[0].clone()


def cache_files(folder) -> list:
    return sorted(folder.glob("*.safetensors"))


def test_second_build_loads_bit_identical(kernel, tmp_path):
    fresh = build(kernel, None)
    first = build(kernel, tmp_path)
    assert first._op.pack_count == 1 and len(cache_files(tmp_path)) == 1
    second = build(kernel, tmp_path)
    assert second._op.pack_count == 0, "the second build packed again instead of loading"
    assert second._op.packed_bytes == fresh._op.packed_bytes
    assert kernels.quantization_error(second) == kernels.quantization_error(fresh)
    for (name, _, nbytes), (name_f, _, nbytes_f) in zip(
        second._op.packed_blobs(), fresh._op.packed_blobs(), strict=True
    ):
        assert (name, nbytes) == (name_f, nbytes_f)
    y = forward(fresh)
    assert torch.equal(forward(first), y)
    assert torch.equal(forward(second), y)
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"


def test_env_variable_enables_cache(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv(pack_cache.PACK_CACHE_ENV, str(tmp_path))
    assert build(kernel, None)._op.pack_count == 1
    assert build(kernel, None)._op.pack_count == 0
    monkeypatch.delenv(pack_cache.PACK_CACHE_ENV)
    assert build(kernel, None)._op.pack_count == 1  # off by default


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_format"])
def test_corrupt_file_is_ignored_and_rewritten(kernel, tmp_path, caplog, damage):
    y = forward(build(kernel, None))
    build(kernel, tmp_path)
    (path,) = cache_files(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:  # a file from another layout version: the metadata no longer matches
        path.write_bytes(data.replace(b"kt-packed-v1/", b"kt-packed-v0/"))
    with caplog.at_level(logging.WARNING, logger=pack_cache.__name__):
        layer = build(kernel, tmp_path)
    assert layer._op.pack_count == 1
    assert any("ignoring" in r.getMessage() for r in caplog.records)
    assert torch.equal(forward(layer), y)
    assert build(kernel, tmp_path)._op.pack_count == 0  # rewritten
    assert cache_files(tmp_path) == [path]


def test_different_weights_different_key(kernel, tmp_path):
    build(kernel, tmp_path, seed=0)
    other = build(kernel, tmp_path, seed=1)
    assert other._op.pack_count == 1 and len(cache_files(tmp_path)) == 2
    assert torch.equal(forward(other), forward(build(kernel, None, seed=1)))
    labelled = build(kernel, tmp_path, seed=0, pack_cache_key="ckpt:model.layers.3.mlp.experts")
    assert labelled._op.pack_count == 1 and len(cache_files(tmp_path)) == 3


def test_fingerprint_follows_weights():
    gate_up, down = weights(0)
    base = pack_cache.weights_fingerprint(gate_up, down)
    assert pack_cache.weights_fingerprint(gate_up.clone(), down.clone()) == base
    edited = gate_up.clone()
    edited.view(-1)[0] += 1  # the first elements are always sampled
    assert pack_cache.weights_fingerprint(edited, down) != base
    assert pack_cache.weights_fingerprint(gate_up.float(), down) != base
    assert pack_cache.weights_fingerprint(*weights(1)) != base


def test_load_packed_validates(kernel):
    layer = build(kernel, None)
    op = layer._op
    blobs = op.packed_blobs()
    assert [(n, b) for n, _, b in blobs] == op.packed_layout()
    other = kernels._C.ExpertsOp(kernel, E, H, I, layer.gate_up_proj.data_ptr(), layer.down_proj.data_ptr(), "bfloat16")
    with pytest.raises(ValueError, match="format"):
        other.load_packed("kt-packed-v0/none", blobs, 0.0, 0.0)
    with pytest.raises(ValueError, match="expected"):
        other.load_packed(op.packed_format, blobs[:-1], 0.0, 0.0)
    name, address, nbytes = blobs[0]
    with pytest.raises(ValueError, match="bytes"):
        other.load_packed(op.packed_format, [(name, address, nbytes - 1), *blobs[1:]], 0.0, 0.0)
    with pytest.raises(ValueError, match="missing"):
        other.load_packed(op.packed_format, [("nope", address, nbytes), *blobs[1:]], 0.0, 0.0)
    assert other.packed_blobs() == []  # left unpacked
    other.load_packed(op.packed_format, blobs, *op.quantization_error)
    assert other.pack_count == 0 and other.packed_bytes == op.packed_bytes


def test_borrowed_tiles_compute_as_owned_ones(kernel):
    """load_packed(..., borrow=True): the op keeps pointers to the given tiles (no copy) and copies the scales; its
    output equals the owning op's, and follows the borrowed bytes (they are not copied)."""
    layer = build(kernel, None)
    op = layer._op
    held = {}  # the lender's buffers: 64-byte aligned copies, kept alive as long as the borrower
    for name, address, nbytes in op.packed_blobs():
        buf = torch.empty(nbytes + 64, dtype=torch.uint8)
        start = -buf.data_ptr() % 64
        held[name] = buf[start : start + nbytes]
        ctypes.memmove(held[name].data_ptr(), address, nbytes)
    lent = [(name, t.data_ptr(), t.numel()) for name, t in held.items()]
    borrower = KTExperts.from_tensors(layer.gate_up_proj, layer.down_proj, kernel=kernel)
    new = kernels.new_operator(borrower)
    new.load_packed(op.packed_format, lent, *op.quantization_error, borrow=True)
    borrower.use_operator(new, packed_source=held)
    assert new.packed_borrowed and not op.packed_borrowed and new.pack_count == 0
    addresses = dict((name, address) for name, address, _ in new.packed_blobs())
    assert addresses["gate_up.data"] == held["gate_up.data"].data_ptr()  # the tiles: borrowed
    assert addresses["down.data"] == held["down.data"].data_ptr()
    assert all(addresses[n] != held[n].data_ptr() for n in held if not n.endswith(".data"))  # the scales: copied
    y = forward(layer)
    assert torch.equal(forward(borrower), y)
    held["down.data"].zero_()  # the op reads the lender's bytes, not a copy of them
    assert not torch.equal(forward(borrower), y)
    name, address, nbytes = lent[0]
    misaligned = [(name, address + 1, nbytes), *lent[1:]]
    with pytest.raises(ValueError, match="64-byte aligned"):
        kernels.new_operator(borrower).load_packed(op.packed_format, misaligned, 0.0, 0.0, borrow=True)


def test_fp32_weights_on_bf16_packing_bypass_cache(tmp_path):
    if "avx512_bf16_packed" not in runnable():
        pytest.skip("avx512_bf16_packed does not run here")
    gate_up, down = weights(0)
    layer = KTExperts.from_tensors(gate_up.float(), down.float(), kernel="avx512_bf16_packed", pack_cache=tmp_path)
    op = layer.operator()
    assert not op.packs and op.packed_format == "" and not cache_files(tmp_path)


def test_pack_experts_builds_the_cpu_only_layers_before_their_first_call(kernel, tmp_path):
    """At train start the plugins pack every CPU-only layer (a progress bar), so the first step does not; the
    packed result is the one a first call would have built, and a layer with a GPU share is left to its first
    use (some never compute on the CPU)."""
    model = torch.nn.ModuleList(
        KTExperts.from_tensors(*weights(seed), kernel=kernel, pack_cache=tmp_path) for seed in range(3)
    )
    model[2].gpu_share = object()  # streamed: stands for a GPU share attached (only its presence is read)
    assert pack_cache.pack_experts(model, progress=False) == 2
    assert len(cache_files(tmp_path)) == 2  # packed now (written through the cache folder)
    ops = [model[0]._op, model[1]._op]
    assert all(op is not None for op in ops) and model[2]._op is None
    assert pack_cache.pack_experts(model, progress=False) == 2  # again: nothing rebuilt
    assert [model[0]._op, model[1]._op] == ops
    torch.testing.assert_close(forward(model[0]), forward(build(kernel, None)), rtol=0, atol=0)
    assert model[0]._op is ops[0]  # the first call used the operator packed before it

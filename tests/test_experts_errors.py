"""Bad inputs give clear Python errors, never a crash."""

from __future__ import annotations

import pytest
import torch
from hf_experts import HIDDEN, make_hf_experts, random_routing

from kt_core import KTExperts, kernels


@pytest.fixture
def experts():
    return KTExperts.from_module(make_hf_experts("qwen3_moe", torch.float32))


@pytest.fixture
def batch():
    ids, w = random_routing(5, 2, seed=0)
    return torch.randn(5, HIDDEN), ids, w


def test_wrong_dtype(experts, batch):
    x, ids, w = batch
    with pytest.raises(TypeError, match="hidden_states must be"):
        experts(x.half(), ids, w)


def test_non_contiguous_is_refused_at_the_kernel_boundary(experts, batch):
    _, ids, w = batch
    wide = torch.randn(5, 2 * HIDDEN)[:, ::2]
    with pytest.raises(ValueError, match="hidden_states must be contiguous"):
        kernels.experts_forward(experts, wide, ids, w)
    # The module itself accepts views: it makes them contiguous on the way to host memory.
    torch.testing.assert_close(experts(wide, ids, w), experts(wide.contiguous(), ids, w))


@pytest.mark.parametrize("bad_id", [7, 100, -2])
def test_expert_id_out_of_range(experts, batch, bad_id):
    x, ids, w = batch
    ids = ids.clone()
    ids[3, 1] = bad_id
    with pytest.raises(ValueError, match=rf"top_k_index\[3, 1\] = {bad_id} is out of range"):
        experts(x, ids, w)


def test_shape_mismatch(experts, batch):
    x, ids, w = batch
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[5, 37\]"):
        experts(x[:, :-1], ids, w)
    with pytest.raises(ValueError, match=r"top_k_weights must have shape \[5, 2\]"):
        experts(x, ids, w[:, :1])
    with pytest.raises(ValueError, match=r"expected hidden_states \[T, H\]"):
        experts(x[None], ids, w)


def test_unknown_or_unavailable_kernel(monkeypatch):
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    hf = make_hf_experts("qwen3_moe", torch.float32)
    with pytest.raises(ValueError, match=r"available: .*torch"):
        KTExperts.from_module(hf, kernel="sparc")
    if "amx" not in kernels.available_kernels():
        with pytest.raises(ValueError, match="kernel='amx'"):
            KTExperts.from_module(hf, kernel="amx")


@pytest.mark.skipif("portable" not in kernels.available_kernels(), reason="the compiled module is not built")
def test_kernel_forced_by_environment(monkeypatch):
    monkeypatch.setenv(kernels.KERNEL_ENV, "portable")
    assert KTExperts.from_module(make_hf_experts("mixtral", torch.float32), kernel="auto").kernel == "portable"
    monkeypatch.setenv(kernels.KERNEL_ENV, "nope")
    with pytest.raises(ValueError, match="KT_KERNEL=nope"):
        KTExperts.from_module(make_hf_experts("mixtral", torch.float32))


def test_bad_weights():
    with pytest.raises(ValueError, match="down_proj must be"):
        KTExperts.from_tensors(torch.randn(4, 10, 8), torch.randn(4, 8, 4))
    with pytest.raises(TypeError, match="no fused `gate_up_proj`"):
        KTExperts.from_module(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="weight dtype"):
        KTExperts(4, 8, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="activation 'gelu'"):
        KTExperts(4, 8, 4, hidden_act="gelu")


def test_experts_stay_in_host_memory_when_the_model_moves(experts):
    model = torch.nn.ModuleDict({"experts": experts, "proj": torch.nn.Linear(2, 2)})
    model.to(torch.float64)
    assert experts.gate_up_proj.dtype == torch.float32  # untouched
    assert model["proj"].weight.dtype == torch.float64


def test_cache_of_other_inputs_is_refused(experts, batch):
    x, ids, w = batch
    _, cache = kernels.experts_forward(experts, x, ids, w, save_for_backward=True)
    if cache is None:
        pytest.skip("the plain-torch kernel keeps no cache")
    with pytest.raises(ValueError, match="cache must be the contiguous fp32 tensor"):
        kernels.experts_backward(experts, x, ids, w, torch.randn_like(x), cache=cache[: cache.numel() // 2])


def test_a_missing_compiled_module_names_the_built_copy_it_shadows(tmp_path, monkeypatch):
    """`python -m` from a source checkout imports the checkout's kt_core, which has no _C, ahead of the installed
    package: the error says where kt_core came from and where a built copy is."""
    installed = tmp_path / "site-packages"
    (installed / "kt_core").mkdir(parents=True)
    (installed / "kt_core" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(kernels, "_C", None)
    monkeypatch.setattr(kernels, "_IMPORT_ERROR", ImportError("cannot import name '_C'"))
    monkeypatch.setattr(kernels.sys, "path", [str(tmp_path / "checkout")])
    with pytest.raises(RuntimeError) as plain:
        kernels.new_operator(KTExperts.from_module(make_hf_experts("qwen3_moe", torch.float32), kernel="torch"))
    assert "kt_core._C is not built" in str(plain.value) and "shadows" not in str(plain.value)
    monkeypatch.setattr(kernels.sys, "path", [str(tmp_path / "checkout"), str(installed)])
    with pytest.raises(RuntimeError, match=r"shadows a built copy at .*site-packages/kt_core.*pip install -e \."):
        kernels.new_operator(KTExperts.from_module(make_hf_experts("qwen3_moe", torch.float32), kernel="torch"))

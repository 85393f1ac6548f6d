"""Activations on a GPU, experts on the CPU: output on the input's device, same numbers."""

from __future__ import annotations

import pytest
import torch
from hf_experts import HIDDEN, make_hf_experts, random_routing

from kt_core import KTExperts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_activations(dtype):
    hf = make_hf_experts("deepseek_v3", dtype)
    ours = KTExperts.from_module(hf, lora_rank=2)
    model = torch.nn.ModuleDict({"experts": ours}).to("cuda")  # the experts must stay behind
    assert ours.gate_up_proj.device.type == "cpu" and ours.lora.gate_up_A.device.type == "cpu"
    ids, w = random_routing(33, 3, seed=0)
    x = torch.randn(33, HIDDEN, dtype=dtype)
    dy = torch.randn(33, HIDDEN, dtype=dtype)

    xc = x.cuda().requires_grad_()
    wc = w.to(dtype).cuda().requires_grad_()
    y = model["experts"](xc, ids.cuda(), wc)
    y.backward(dy.cuda())
    assert y.device.type == "cuda" and xc.grad.device.type == "cuda" and wc.grad.device.type == "cuda"

    xh = x.clone().requires_grad_()
    wh = w.to(dtype).clone().requires_grad_()
    lora_grads = [p.grad.clone() for p in ours.lora.factors()]
    ours.zero_grad()
    y_host = ours(xh, ids, wh)
    y_host.backward(dy)
    torch.testing.assert_close(y.cpu(), y_host)
    torch.testing.assert_close(xc.grad.cpu(), xh.grad)
    torch.testing.assert_close(wc.grad.cpu(), wh.grad)
    for g, p in zip(lora_grads, ours.lora.factors(), strict=True):
        torch.testing.assert_close(g, p.grad)

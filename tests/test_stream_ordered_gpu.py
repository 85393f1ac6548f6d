"""StreamOrderedForward on a GPU: the CPU experts enqueued on a CUDA stream, eagerly and inside a CUDA graph.

Each replay of a captured graph must run the experts on that replay's inputs (copied in place into the
graph's input tensors), equal to KTExperts' ordinary forward; a side stream forked and joined inside the
capture (as the SGLang method does) must give the same.

Legend: T = tokens, K = experts per token, H = hidden.
"""

from __future__ import annotations

import pytest
import torch
from hf_experts import HIDDEN, NUM_EXPERTS, make_hf_experts, random_routing

from kt_core import KTExperts, kernels
from kt_core.experts import PinnedArenas, StreamOrderedForward

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

K = 3


def _inputs(T, dtype, seed):
    ids, w = random_routing(T, K, seed=seed, experts_used=NUM_EXPERTS - 2)
    ids[0, 0] = -1
    x = torch.randn(T, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x, ids, w


def _expected(experts, x, ids, w):
    return kernels.experts_forward(experts, x, ids, w.float())[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_and_graph_replays_equal_the_ordinary_forward(dtype):
    experts = KTExperts.from_module(make_hf_experts("qwen3_moe", dtype))
    forward = StreamOrderedForward(experts, PinnedArenas(HIDDEN, K, dtype, max_tokens=64))
    T = 9
    x, ids, w = _inputs(T, dtype, seed=1)
    x_dev, ids_dev, w_dev = x.cuda(), ids.cuda(), w.cuda()
    y = forward(x_dev, ids_dev, w_dev)  # eager: also makes the pinned buffers before the capture
    torch.testing.assert_close(y.cpu(), _expected(experts, x, ids, w), rtol=0, atol=0)

    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    with torch.cuda.graph(graph):
        out = torch.empty_like(x_dev)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward(x_dev, ids_dev, w_dev, out)
        torch.cuda.current_stream().wait_stream(side)
        y_graph = out * 2
    for seed in (2, 3):  # new inputs in place, as a graph runner does
        x, ids, w = _inputs(T, dtype, seed=seed)
        x_dev.copy_(x), ids_dev.copy_(ids), w_dev.copy_(w)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y_graph.cpu(), 2 * _expected(experts, x, ids, w), rtol=0, atol=0)


def test_layers_of_one_host_row_map_share_the_arena():
    # Two layers, the second holding only some experts in host memory (ids of the others are skipped).
    dtype = torch.bfloat16
    a = KTExperts.from_module(make_hf_experts("qwen3_moe", dtype, seed=1))
    b_full = make_hf_experts("qwen3_moe", dtype, seed=2)
    host_ids = [1, 2, 4, 6]
    b = KTExperts.from_tensors(
        b_full.gate_up_proj.detach()[host_ids],
        b_full.down_proj.detach()[host_ids],
        expert_ids=host_ids,
        total_experts=NUM_EXPERTS,
    )
    arenas = PinnedArenas(HIDDEN, K, dtype, max_tokens=32)
    fa, fb = StreamOrderedForward(a, arenas), StreamOrderedForward(b, arenas)
    x, ids, w = _inputs(17, dtype, seed=5)
    ya = fa(x.cuda(), ids.cuda(), w.cuda())
    yb = fb(x.cuda(), ids.cuda(), w.cuda())
    torch.testing.assert_close(ya.cpu(), _expected(a, x, ids, w), rtol=0, atol=0)
    kept = torch.isin(ids, torch.tensor(host_ids))
    torch.testing.assert_close(yb.cpu(), _expected(b, x, b.rows_of(torch.where(kept, ids, -1)), w), rtol=0, atol=0)

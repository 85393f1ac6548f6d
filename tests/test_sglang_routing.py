"""`--kt-experts-record-routing` (kt_plugins/sglang/routing.py) and feeding its file back through
`--kt-experts-gpu-expert-ids FILE --kt-experts-gpu-experts N` (the N most routed experts of each layer on the GPU).
Needs no sglang: the recorder and the options import torch and kt_core only."""

from __future__ import annotations

import json

import pytest
import torch

from kt_plugins.sglang.options import KTExpertsOptions
from kt_plugins.sglang.routing import RoutingRecorder

E = 8


def test_counts_every_routed_slot_and_writes_them_atomically(tmp_path):
    path = tmp_path / "routing.json"
    recorder = RoutingRecorder(path, interval_s=0)
    layer0, layer3 = recorder.counter(0, E, "cpu"), recorder.counter(3, E, "cpu")
    assert recorder.counter(0, E, "cpu") is layer0  # one per layer
    ids = torch.tensor([[5, 1], [5, -1], [7, 5]], dtype=torch.int32)  # [T, K]; -1: a slot computed elsewhere
    RoutingRecorder.record(layer0, ids)
    RoutingRecorder.record(layer0, ids[:1])
    RoutingRecorder.record(layer3, ids[2:])
    recorder.write()
    counts = json.loads(path.read_text())["counts"]
    assert counts["0"] == [0, 2, 0, 0, 0, 4, 0, 1]
    assert counts["3"] == [0, 0, 0, 0, 0, 1, 0, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["routing.json"]  # no temp file left


def test_the_file_fed_back_keeps_each_layers_most_routed_experts(tmp_path):
    path = tmp_path / "routing.json"
    path.write_text(json.dumps({"counts": {"0": [3, 0, 9, 9, 1, 0, 0, 2], "2": [0] * E}}))
    options = KTExpertsOptions(gpu_expert_ids=str(path), gpu_experts="3")
    assert options.gpu_expert_list(0, E) == [0, 2, 3]  # counts 9, 9, 3 (ties: lower id first)
    assert options.gpu_expert_list(2, E) == [0, 1, 2]  # nothing routed: the first ids
    assert options.gpu_expert_list(5, E) == []  # a layer the file does not know
    assert KTExpertsOptions(gpu_expert_ids=str(path), gpu_experts="0.25").gpu_expert_list(0, E) == [2, 3]
    with pytest.raises(ValueError, match="--kt-experts-gpu-experts N"):
        KTExpertsOptions(gpu_expert_ids=str(path))  # how many is not said
    path.write_text(json.dumps({"counts": {"0": [1, -2]}}))
    with pytest.raises(ValueError, match="layer 0: expected a list of routing counts"):
        KTExpertsOptions(gpu_expert_ids=str(path), gpu_experts="1")


def test_record_routing_needs_an_existing_folder(tmp_path):
    assert KTExpertsOptions(record_routing=str(tmp_path / "r.json")).record_routing
    with pytest.raises(ValueError, match="--kt-experts-record-routing"):
        KTExpertsOptions(record_routing=str(tmp_path / "missing" / "r.json"))

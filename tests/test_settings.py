"""Every setting is checked where it enters, and a bad one fails naming the key, the value and what fits.

Tables of bad (and borderline) inputs for each entry point: the shared validators (kt_core.settings), the
LLaMA-Factory keys (kt_plugins.llamafactory.config), the KTCallback arguments, the SGLang flags, the
`KT_*` environment variables, placement rules, and training checkpoints a run resumes from. The same rows
through the real `llamafactory-cli` are in integration_tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from kt_core import settings
from kt_core.settings import SettingError
from kt_plugins.llamafactory.config import check_training_args, split_kt_args
from kt_plugins.sglang.options import ENV_VAR, KTExpertsOptions, options_from_env

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


# ---- shared validators --------------------------------------------------------------------------------

SIZES = [(123, 123), (1e9, 10**9), ("80GB", 80 * 10**9), ("70GiB", 70 * 2**30), ("1.5 MiB", int(1.5 * 2**20)), ("0", 0)]


@pytest.mark.parametrize(("value", "expected"), SIZES)
def test_parse_size_reads_bytes_and_units(value, expected):
    assert settings.parse_size(value) == expected


@pytest.mark.parametrize("value", ["many", "10 GiBs", "-1GiB", -5, float("nan"), True, None, "", [1]])
def test_parse_size_refuses_naming_the_key(value):
    with pytest.raises(SettingError, match=r"^kt_stream_keep_bytes: got .*expected a size"):
        settings.parse_size(value, "kt_stream_keep_bytes")


def test_memory_plan_parses_sizes_with_the_same_parser():
    from kt_core.loading.memory import parse_size

    assert parse_size is settings.parse_size


@pytest.mark.parametrize(("value", "expected"), [(4, 4), ("4", 4), (" 16 ", 16)])
def test_positive_int_accepts(value, expected):
    assert settings.positive_int("k", value) == expected


@pytest.mark.parametrize("value", [0, -5, True, False, 2.7, 2.0, "four", "2.7", "", None])
def test_positive_int_refuses(value):
    with pytest.raises(SettingError, match=r"^chunk_size: got .*, expected a positive integer"):
        settings.positive_int("chunk_size", value)


@pytest.mark.parametrize(
    ("value", "expected"), [(True, True), ("false", False), ("1", True), (0, False), ("Yes", True)]
)
def test_boolean_accepts(value, expected):
    assert settings.boolean("use_kt", value) is expected


@pytest.mark.parametrize("value", ["maybe", 2, None, 1.0])
def test_boolean_refuses(value):
    with pytest.raises(SettingError, match=r"^use_kt: got .*, expected true or false"):
        settings.boolean("use_kt", value)


@pytest.mark.parametrize("value", ["int3", "INT8", True, 8])
def test_choice_lists_the_allowed_values(value):
    with pytest.raises(SettingError, match=r"expected one of null, 'int8'"):
        settings.choice("kt_stream_quantize", value, (None, "int8"))
    assert settings.choice("kt_stream_quantize", None, (None, "int8")) is None


def test_cpu_threads_warns_past_the_cpus_and_caps_far_past_them(monkeypatch, caplog):
    monkeypatch.setattr(settings, "usable_cpus", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="kt_core.settings"):
        assert settings.cpu_threads("cpu_infer", 2) == 2
        assert not caplog.records
        assert settings.cpu_threads("cpu_infer", 8) == 8  # 4x: warned, kept
        assert "cpu_infer=8 is more than the 2 CPUs this process may use" in caplog.text
        assert settings.cpu_threads("cpu_infer", 10000) == 2  # past 4x: one thread per CPU
        assert "cpu_infer=10000 is more than 4x the 2 CPUs" in caplog.text and "running 2 threads" in caplog.text
    assert settings.cpu_threads("cpu_infer", None) is None


@pytest.mark.parametrize("value", ["four", "0", "true", "2.5"])
def test_kt_cpu_infer_environment_variable_is_checked(monkeypatch, value):
    from kt_core.runtime.pool import default_cpu_infer

    monkeypatch.setenv("KT_CPU_INFER", value)
    with pytest.raises(SettingError, match=r"^KT_CPU_INFER: got"):
        default_cpu_infer()


# ---- LLaMA-Factory keys -------------------------------------------------------------------------------

# (extra YAML keys, the start of the expected message); each row also names the key as written.
LLAMAFACTORY_BAD = [
    ({"chunk_size": -5}, "chunk_size: got -5, expected a positive integer (tokens per CPU-experts call"),
    ({"chunk_size": 0}, "chunk_size: got 0, expected a positive integer"),
    ({"chunk_size": "lots"}, "chunk_size: got 'lots'"),
    ({"cpu_infer": True}, "cpu_infer: got True, expected a positive integer"),
    ({"cpu_infer": 2.7}, "cpu_infer: got 2.7, expected a positive integer"),
    ({"cpu_infer": "four"}, "cpu_infer: got 'four', expected a positive integer"),
    ({"kt_stream_quantize": "int3"}, "kt_stream_quantize: got 'int3', expected one of null, 'int8'"),
    ({"kt_stream_keep_bytes": "many"}, "kt_stream_keep_bytes: got 'many', expected a size"),
    ({"kt_stream_mode": "fast"}, "kt_stream_mode: got 'fast', expected one of 'auto', 'gpu', 'cpu'"),
    ({"kt_stream_dequant_bytes": "some"}, "kt_stream_dequant_bytes: got 'some', expected a size"),
    ({"kt_gpu_memory_limit": "lots"}, "kt_gpu_memory_limit: got 'lots', expected a size"),
    ({"kt_host_memory_limit": -1}, "kt_host_memory_limit: got -1, expected a size"),
    ({"kt_maxlen": 0}, "kt_maxlen: got 0, expected a positive integer"),
    ({"kt_expert_lora": "maybe"}, "kt_expert_lora: got 'maybe', expected true or false"),
    ({"use_kt": "sure"}, "use_kt: got 'sure', expected true or false"),
    ({"kt_kernel": "avx9000"}, "kt_kernel: kernel='avx9000': this kernel cannot run here"),
    ({"kt_device": "gpu0"}, "kt_device: got 'gpu0', expected a device"),
    ({"kt_optimize_rule": "no/such/rules.yaml"}, "kt_optimize_rule: Rule file no/such/rules.yaml not found"),
    ({"kt_loss": "fast"}, "`kt_loss` must be one of"),
    ({"kt_keep_host_weights": "maybe"}, "kt_keep_host_weights: got 'maybe', expected true or false"),
    ({"kt_cpu_thread": 4}, "unknown kt-plugins key(s) kt_cpu_thread"),
    ({"kt_gpu_memory_budget": "1GiB", "kt_expert_gpu_memory": "2GiB"}, "kt_gpu_memory_budget and kt_expert_gpu"),
]
LLAMAFACTORY_NEEDS_GPU = [
    ({"kt_expert_gpu_memory": "10GiB"}, "kt_expert_gpu_memory: got '10GiB', but this process sees no CUDA GPU"),
    ({"kt_device": "cuda:0"}, "kt_device: got 'cuda:0', but this process sees no CUDA GPU"),
]


@pytest.mark.parametrize(("extra", "message"), LLAMAFACTORY_BAD, ids=lambda v: str(v)[:40])
def test_llamafactory_key_refused_at_parse_time(extra, message):
    with pytest.raises(ValueError) as info:
        split_kt_args({"use_kt": True, "model_name_or_path": "m", **extra})
    assert str(info.value).startswith(message), str(info.value)


@no_cuda
@pytest.mark.parametrize(("extra", "message"), LLAMAFACTORY_NEEDS_GPU, ids=lambda v: str(v)[:40])
def test_llamafactory_gpu_setting_without_cuda_is_refused(extra, message):
    with pytest.raises(SettingError) as info:
        split_kt_args({"use_kt": True, **extra})
    assert str(info.value).startswith(message) and "remove" in str(info.value)


def test_llamafactory_command_line_strings_are_read():
    _, parsed = split_kt_args(["--use_kt", "true", "--chunk_size=5", "--cpu_infer", "2", "--kt_expert_lora", "0"])
    assert (parsed.chunk_size, parsed.cpu_infer, parsed.kt_expert_lora) == (5, 2, False)


def test_llamafactory_chunking_is_off_unless_given_and_the_log_says_so():
    _, parsed = split_kt_args({"use_kt": True})
    assert parsed.chunk_size is None
    from kt_core.kernels import resolve_kernel

    text = parsed.describe()
    assert "no chunking (each CPU-experts call takes the whole batch)" in text
    assert f"kernel {resolve_kernel('auto')}" in text  # the kernel "auto" resolves to, not "auto"
    _, parsed = split_kt_args({"use_kt": True, "chunk_size": 8192})
    assert "chunk_size 8192 tokens per CPU-experts call" in parsed.describe()


def test_llamafactory_cpu_infer_far_past_the_cpus_runs_one_thread_per_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        _, parsed = split_kt_args({"use_kt": True, "cpu_infer": 10000})
    cpus = settings.usable_cpus()
    assert parsed.cpu_infer == cpus
    assert f"the {cpus} CPUs this process may use" in caplog.text


def test_llamafactory_keys_without_use_kt_warn_that_nothing_happens(caplog):
    with caplog.at_level(logging.WARNING):
        _, parsed = split_kt_args({"cpu_infer": 2})
    assert parsed is None and "cpu_infer have no effect without use_kt: true" in caplog.text


@pytest.mark.parametrize("kind", ["full", "freeze"])
def test_llamafactory_full_finetuning_is_refused(kind):
    _, parsed = split_kt_args({"use_kt": True})

    class FinetuningArguments:
        finetuning_type = kind

    with pytest.raises(SettingError, match=rf"^finetuning_type: got '{kind}' with use_kt: true, expected 'lora'"):
        check_training_args(parsed, FinetuningArguments(), do_train=True)
    check_training_args(parsed, FinetuningArguments(), do_train=False)  # chat / export of a full model: fine


# ---- KTCallback arguments -----------------------------------------------------------------------------

CALLBACK_BAD = [
    ({"cpu_infer": True}, r"^KTCallback\(cpu_infer\): got True, expected a positive integer"),
    ({"cpu_infer": 0}, r"^KTCallback\(cpu_infer\): got 0"),
    ({"log_speed": "sometimes"}, r"^KTCallback\(log_speed\): got 'sometimes'"),
    ({"kernel": "avx9000"}, r"kernel='avx9000': this kernel cannot run here"),
    ({"rules": "no/such/rules.yaml"}, r"Rule file no/such/rules.yaml not found"),
    ({"expert_gpu_memory": "ten"}, r"^KTCallback\(expert_gpu_memory\): got 'ten', expected a size"),
    ({"expert_gpu_memory": "1GiB", "stream_keep_bytes": "many"}, r"^KTCallback\(stream_keep_bytes\): got 'many'"),
    ({"expert_gpu_memory": "1GiB", "stream_quantize": "int3"}, r"^KTCallback\(stream_quantize\): got 'int3'"),
    ({"expert_gpu_memory": "1GiB", "stream_mode": "fast"}, r"^KTCallback\(stream_mode\): got 'fast'"),
    ({"expert_gpu_memory": "1GiB", "stream_dequant_bytes": "x"}, r"^KTCallback\(stream_dequant_bytes\): got 'x'"),
    ({"loss": "fast"}, r"`KTCallback\(loss\)` must be one of"),
    ({"gpu_memory_limit": "lots"}, r"^KTCallback\(gpu_memory_limit\): got 'lots', expected a size"),
    ({"gpu_memory_budget": "1GiB", "expert_gpu_memory": "1GiB"}, r"^KTCallback\(gpu_memory_budget\) and "),
]


@pytest.mark.parametrize(("kwargs", "message"), CALLBACK_BAD, ids=lambda v: str(v)[:40])
def test_ktcallback_arguments_are_checked_when_built(kwargs, message):
    from kt_plugins.hf_trainer import KTCallback

    with pytest.raises((ValueError, FileNotFoundError), match=message):
        KTCallback(**kwargs)


@no_cuda
def test_ktcallback_streaming_without_cuda_is_refused():
    from kt_plugins.hf_trainer import KTCallback

    with pytest.raises(SettingError, match=r"^KTCallback\(expert_gpu_memory\): got '10GiB', but .* no CUDA GPU"):
        KTCallback(expert_gpu_memory="10GiB")


# ---- SGLang flags -------------------------------------------------------------------------------------

SGLANG_BAD = [
    ({"cpu_threads": True}, r"^--kt-experts-cpu-threads: got True"),
    ({"cpu_threads": 0}, r"^--kt-experts-cpu-threads: got 0"),
    ({"chunk_size": -5}, r"^--kt-experts-chunk-size: got -5, expected a positive integer"),
    ({"gpu_experts": "1.5"}, r"^--kt-experts-gpu-experts: a ratio must lie in \[0, 1\)"),
    ({"gpu_expert_ids": "0,x"}, r"^--kt-experts-gpu-expert-ids: expected comma-separated expert ids"),
]


@pytest.mark.parametrize(("kwargs", "message"), SGLANG_BAD, ids=lambda v: str(v)[:40])
def test_sglang_flags_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KTExpertsOptions(**kwargs)


ID_FILES = [
    ('{"0": [1, 2', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"zero": [1]}', "key 'zero' is not a layer index"),
    ('{"0": [1, -2]}', "layer 0: expected a list of expert ids"),
    ('{"0": "1,2"}', "layer 0: expected a list of expert ids"),
]


@pytest.mark.parametrize(("text", "message"), ID_FILES)
def test_sglang_expert_id_file_is_checked_in_the_launching_process(tmp_path, text, message):
    path = tmp_path / "hot.json"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        KTExpertsOptions(gpu_expert_ids=str(path))
    assert str(info.value).startswith(f"--kt-experts-gpu-expert-ids {path}: ") and message in str(info.value)


def test_sglang_expert_id_file_gives_each_layer_its_ids(tmp_path):
    path = tmp_path / "hot.json"
    path.write_text(json.dumps({"0": [3, 1], "2": []}))
    options = KTExpertsOptions(gpu_expert_ids=str(path))
    assert options.gpu_expert_list(0, 4) == [1, 3] and options.gpu_expert_list(1, 4) == []
    with pytest.raises(ValueError, match=r"hot.json \(layer 0\): expert ids \[3\] are out of range \[0, 2\)"):
        options.gpu_expert_list(0, 2)


def test_sglang_environment_variable_is_checked():
    with pytest.raises(ValueError, match=rf"^{ENV_VAR}: not valid JSON"):
        options_from_env({ENV_VAR: "{chunk"})
    with pytest.raises(ValueError, match=r"^--kt-experts-chunk-size: got 0"):
        options_from_env({ENV_VAR: json.dumps({"chunk_size": 0})})


# ---- placement rules ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tiny_models import build_tiny_model, save_fused_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "qwen3_moe"
    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=2), path)
    return path


def test_rule_file_that_matches_nothing_is_an_error_naming_it(tiny_checkpoint, tmp_path):
    from kt_core import RuleError, load_model

    rules = tmp_path / "mine.yaml"
    rules.write_text("- match: {name: '^model\\.blocks\\.\\d+\\.moe$'}\n  replace: {class: kt}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-rule "matched no module" warning comes first
        with pytest.raises(RuleError) as info:
            load_model(tiny_checkpoint, device="cpu", rules=str(rules), progress=False)
    text = str(info.value)
    assert text.startswith(f"{rules}: no rule puts a routed-experts module") and "model.layers.0.mlp.experts" in text


@no_cuda
@pytest.mark.parametrize(
    "rules", ["multi-gpu.yaml", "examples/kt_optimize_rules/DeepSeek-V3-Chat-sft-amx-multi-gpu.yaml"]
)
def test_gpu_rule_file_without_cuda_names_the_rule(tiny_checkpoint, rules):
    from kt_core import RuleError, load_model

    with pytest.raises(RuleError) as info:
        load_model(tiny_checkpoint, device="cpu", rules=rules, progress=False)
    text = str(info.value)
    assert "multi-gpu" in text.split(":")[0] and "rule" in text and "no CUDA device" in text, text


# ---- training checkpoints -----------------------------------------------------------------------------


def _good_checkpoint(folder):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.ones(4, 4)}, str(folder / "adapter_model.safetensors"))
    torch.save({"state": {}}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    return folder


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


BROKEN = {
    "empty folder": (lambda f: None, "the folder is empty"),
    "truncated adapter": (
        lambda f: _truncate(f / "adapter_model.safetensors", 90),
        "adapter_model.safetensors is truncated",
    ),
    "truncated optimizer": (lambda f: _truncate(f / "optimizer.pt", 100), "optimizer.pt is truncated"),
    "bad state json": (lambda f: (f / "trainer_state.json").write_text("{"), "trainer_state.json is not valid JSON"),
    "no state": (lambda f: (f / "trainer_state.json").unlink(), "has no trainer_state.json"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_names_itself_and_the_previous_good_one(tmp_path, case):
    from kt_core.loading import CheckpointError, check_training_checkpoint, last_good_checkpoint

    good = _good_checkpoint(tmp_path / "checkpoint-2")
    broken = tmp_path / "checkpoint-4"
    if case == "empty folder":
        broken.mkdir()
    else:
        _good_checkpoint(broken)
    BROKEN[case][0](broken)
    with pytest.raises(CheckpointError) as info:
        check_training_checkpoint(broken)
    text = str(info.value)
    assert text.startswith(f"cannot resume from {broken}: ") and BROKEN[case][1] in text
    assert f"the newest complete checkpoint before it is {good}" in text
    assert last_good_checkpoint(tmp_path) == good
    check_training_checkpoint(good)


# ---- truthful logs ------------------------------------------------------------------------------------


def _experts_model(reentrant: bool | None):
    """Two KTExperts layers (the plain-torch kernel), each behind a linear layer, checkpointed or not."""
    from kt_core import KTExperts

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.layers = torch.nn.ModuleList(
                KTExperts.from_tensors(
                    torch.randn(4, 16, 8, generator=g), torch.randn(4, 8, 8, generator=g), kernel="torch"
                )
                for _ in range(2)
            )
            self.proj = torch.nn.Linear(8, 8)

        def block(self, layer, x):
            ids = torch.tensor([[0, 1]] * x.shape[0])
            return x + layer(self.proj(x), ids, torch.full(ids.shape, 0.5))

        def forward(self, x):
            for layer in self.layers:
                if reentrant is None:
                    x = self.block(layer, x)
                else:
                    x = torch.utils.checkpoint.checkpoint(self.block, layer, x, use_reentrant=reentrant)
            return x

    return Model()


@pytest.mark.parametrize("reentrant", [None, False, True], ids=["no-checkpointing", "non-reentrant", "reentrant"])
def test_expert_time_is_the_operators_time_recomputation_included(reentrant, monkeypatch):
    """The operator's calls take known time (30 ms per forward, 20 ms per backward): 2 steps x 2 layers of
    forward + backward, and with gradient checkpointing each layer's recomputed forward as well, which the CPU
    computes like any other (and which streaming's CPU time counts too)."""
    import time

    from kt_core import kernels
    from kt_core.runtime.expert_time import ExpertTimer

    calls = {"forward": 0, "backward": 0}

    def slow(name, seconds, inner):
        def call(*args, **kwargs):
            calls[name] += 1
            time.sleep(seconds)
            return inner(*args, **kwargs)

        return call

    # the timing wraps what these two do: patch beneath it (the reference kernel's own work)
    monkeypatch.setattr(kernels, "experts_reference", slow("forward", 0.03, kernels.experts_reference))
    monkeypatch.setattr(kernels, "_reference_backward", slow("backward", 0.02, kernels._reference_backward))
    model = _experts_model(reentrant)
    x = torch.randn(3, 8, requires_grad=True)
    model(x).sum().backward()  # first calls (lazy set-up) left out
    calls.update(forward=0, backward=0)
    timer = ExpertTimer(model)
    for _ in range(2):
        model(x).sum().backward()
    expert_s, _ = timer.take()
    forwards = calls["forward"] - calls["backward"]  # the reference backward runs the forward once inside
    assert forwards == (8 if reentrant is not None else 4) and calls["backward"] == 4
    slept = 0.03 * calls["forward"] + 0.02 * calls["backward"]
    assert slept * 0.98 < expert_s < slept * 1.25, (expert_s, slept)
    assert timer.take()[0] < 0.01  # taken: counting starts again


def test_no_peft_unsupported_layer_warning_for_our_layer(tiny_checkpoint):
    from peft import LoraConfig, get_peft_model

    from kt_core import load_model

    model = load_model(tiny_checkpoint, device="cpu", progress=False)
    config = LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        from kt_core.peft import ignore_peft_layer_warning

        ignore_peft_layer_warning()  # load_model installed it; catch_warnings reset the filters for the test
        get_peft_model(model, config)
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        ignore_peft_layer_warning()
        message = "Unsupported layer type '<class 'torch.nn.Foo'>' encountered, proceed at your own risk."
        warnings.warn(message, UserWarning, stacklevel=1)
    assert len(caught) == 1  # another layer type keeps PEFT's warning


# `gpu_memory_budget` was renamed `expert_gpu_memory` (next to `gpu_memory_limit`, the whole run's cap): the
# former name still works, with a warning.


@no_cuda
def test_former_llamafactory_key_still_works(caplog):
    refused = pytest.raises(SettingError, match=r"^kt_expert_gpu_memory: got '1GiB', but this process sees no")
    with caplog.at_level(logging.WARNING, logger="kt_core"), refused:
        split_kt_args({"use_kt": True, "kt_gpu_memory_budget": "1GiB"})  # checked under its new name
    assert "kt_gpu_memory_budget is now called kt_expert_gpu_memory" in caplog.text


@no_cuda
def test_former_ktcallback_argument_still_works(caplog):
    from kt_plugins.hf_trainer import KTCallback

    refused = pytest.raises(SettingError, match=r"^KTCallback\(expert_gpu_memory\): got '1GiB', but .* no CUDA")
    with caplog.at_level(logging.WARNING, logger="kt_core"), refused:
        KTCallback(gpu_memory_budget="1GiB")
    assert "KTCallback(gpu_memory_budget) is now called KTCallback(expert_gpu_memory)" in caplog.text


def test_former_enable_streaming_argument_still_works(caplog):
    from kt_core import enable_streaming
    from tests.test_streaming import ToyMoE

    with caplog.at_level(logging.WARNING, logger="kt_core"):
        runtime = enable_streaming(ToyMoE(1), device="cpu", gpu_memory_budget=0)
    assert runtime.store.capacity == 0 and "gpu_memory_budget is now called expert_gpu_memory" in caplog.text

"""Patches applied to stock LLaMA-Factory right after its modules are imported (see boot.py).

- `llamafactory.hparams.parser`: `_parse_train_args / _parse_infer_args / _parse_eval_args` drop our keys
  (config.py) before LLaMA-Factory's own parser sees them and remember the settings on `model_args`; a
  training run's GPU memory plan is checked there, before anything is loaded (model.py, plan_gpu_memory).
  LLaMA-Factory therefore never sees `use_kt: true` and runs its plain Hugging Face path: its trainer,
  stock PEFT, chat / api / webchat engine and export all stay LLaMA-Factory's.
- `llamafactory.model.loader`: `load_model` builds the model through kt_core when the settings ask for it.
- `llamafactory.train.tuner`: `_training_function` gets one more Trainer callback, which, for a model with
  CPU experts (and for no other), checks the checkpoint the run resumes from, keeps the experts out of FSDP2's
  sharding or out of DeepSpeed when the Trainer's accelerator runs either (`accelerate launch` with an FSDP config,
  `fsdp` / `fsdp_config` or `deepspeed` in the YAML; kt_plugins.hf_trainer.engines, as KTCallback does) and adds
  `kt_tokens_per_s` and `kt_cpu_expert_share` to the training logs.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import sys
from pathlib import Path

from kt_plugins.llamafactory.config import check_training_args, split_kt_args

__all__ = ["TESTED_VERSIONS", "check_version", "patch_loader", "patch_parser", "patch_tuner"]

logger = logging.getLogger("llamafactory.kt_plugins")  # under LLaMA-Factory's own log handlers

TESTED_VERSIONS = ("0.9.5",)
SKIP_VERSION_CHECK_ENV = "KT_LLAMAFACTORY_SKIP_VERSION_CHECK"
SETTINGS_ATTR = "kt_settings"
_PARSE_FUNCTIONS = ("_parse_train_args", "_parse_infer_args", "_parse_eval_args")


def check_version() -> str:
    """Returns LLaMA-Factory's version; raises when it is outside the tested range (opt-out by env var)."""
    try:
        version = importlib.metadata.version("llamafactory")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown (not installed as the `llamafactory` distribution)"
    if version not in TESTED_VERSIONS and not os.environ.get(SKIP_VERSION_CHECK_ENV):
        raise RuntimeError(
            f"use_kt: kt-plugins is tested with LLaMA-Factory {', '.join(TESTED_VERSIONS)}, found {version}. "
            f"Install a tested version (pip install llamafactory=={TESTED_VERSIONS[-1]}) or set "
            f"{SKIP_VERSION_CHECK_ENV}=1 to try anyway."
        )
    return version


def _config_dir() -> Path | None:
    """The folder of the YAML / JSON file of `llamafactory-cli <cmd> x.yaml` (LLaMA-Factory reads it from
    sys.argv[1], possibly before calling the parser with the resulting dict)."""
    if len(sys.argv) > 1 and sys.argv[1].endswith((".yaml", ".yml", ".json")):
        return Path(sys.argv[1]).resolve().parent
    return None


def patch_parser(parser_module) -> None:
    """Wraps the three argument-parsing entry points of llamafactory.hparams.parser (idempotent)."""
    if getattr(parser_module, "_kt_patched", False):
        return
    for name in _PARSE_FUNCTIONS:
        original = getattr(parser_module, name, None)
        if original is not None:
            setattr(parser_module, name, _wrap_parse(parser_module, original))
    parser_module._kt_patched = True


def _wrap_parse(parser_module, original):
    @functools.wraps(original)
    def parse(args=None):
        cleaned, settings = split_kt_args(parser_module.read_args(args), _config_dir())
        parsed = original(cleaned)
        if settings is not None:
            version = check_version()
            _check_local_checkpoint(parsed[0].model_name_or_path)
            _check_training(parsed, settings)
            _plan_gpu_memory(parsed, settings)
            logger.info("kt-plugins takes over use_kt (LLaMA-Factory %s): %s", version, settings.describe())
            setattr(parsed[0], SETTINGS_ATTR, settings)  # parsed[0] is ModelArguments
            _apply_generation_settings(parsed, settings)
        return parsed

    return parse


def _check_training(parsed, settings) -> None:
    """finetuning_type against what use_kt can train (the parsed tuple holds LLaMA-Factory's dataclasses)."""
    finetuning = next((a for a in parsed if hasattr(a, "finetuning_type")), None)
    do_train = any(getattr(a, "do_train", False) for a in parsed)
    if finetuning is not None:
        check_training_args(settings, finetuning, do_train)


def _plan_gpu_memory(parsed, settings) -> None:
    """A training run's GPU memory plan, before anything is loaded (model.py); refuses one that cannot fit."""
    if len(parsed) < 4 or not getattr(parsed[2], "do_train", False):
        return  # (model, data, training, finetuning, generating) arguments of a training run only
    from kt_plugins.llamafactory.model import plan_gpu_memory

    plan_gpu_memory(settings, *parsed[:4])


def _check_local_checkpoint(path: str) -> None:
    """use_kt streams weights from a local folder: say so before LLaMA-Factory tries the model hub."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise ValueError(
            f"use_kt: model_name_or_path {path!r} {what}; expected a local checkpoint folder "
            "(config.json, *.safetensors and the tokenizer files)"
        )


def _apply_generation_settings(parsed, settings) -> None:
    """kt_maxlen / kt_force_think of the inference YAMLs, on LLaMA-Factory's own generation knobs."""
    for args in parsed:
        if "kt_maxlen" in settings.given and hasattr(args, "max_new_tokens"):
            args.max_new_tokens = settings.kt_maxlen
        if settings.kt_force_think and hasattr(args, "enable_thinking"):
            args.enable_thinking = True


def patch_loader(loader_module) -> None:
    """Wraps llamafactory.model.loader.load_model (idempotent)."""
    if getattr(loader_module, "_kt_patched", False):
        return
    original = loader_module.load_model

    @functools.wraps(original)
    def load_model(tokenizer, model_args, finetuning_args, is_trainable=False, add_valuehead=False):
        settings = getattr(model_args, SETTINGS_ATTR, None)
        if settings is None:
            return original(tokenizer, model_args, finetuning_args, is_trainable, add_valuehead)
        from kt_plugins.llamafactory.model import kt_model_building

        _route_kt_core_logs()
        with kt_model_building(loader_module, settings, model_args, finetuning_args, is_trainable):
            model = original(tokenizer, model_args, finetuning_args, is_trainable, add_valuehead)
        object.__setattr__(model, SETTINGS_ATTR, settings)  # for the training callback (kt_keep_host_weights)
        if not is_trainable and not getattr(model_args, "export_dir", None) and not settings.kt_keep_host_weights:
            _free_weights_once_packed(model)  # chat / api / webchat: forward only; export reads the weights
        return model

    loader_module.load_model = load_model
    loader_module._kt_patched = True


def _free_weights_once_packed(model) -> None:
    """Inference holds the routed experts once in host RAM: each layer's first forward on a packed kernel frees its
    weights (KTExperts.release_after_packing; kt_keep_host_weights: true keeps them)."""
    from kt_core import KTExperts

    for module in model.modules():
        if isinstance(module, KTExperts):
            module.release_after_packing = True


def _route_kt_core_logs() -> None:
    """kt_core's log lines (loading, packing, weights freed) go out through LLaMA-Factory's handler at its level, as
    ours do; without it they would reach no handler (Python's last resort prints warnings only)."""
    library, core = logging.getLogger("llamafactory"), logging.getLogger("kt_core")
    handlers = [h for h in library.handlers if h not in core.handlers]
    if not handlers:
        return
    for handler in handlers:
        core.addHandler(handler)
    core.setLevel(library.level)
    core.propagate = False  # (the root logger may have handlers of its own: no line twice)


def patch_tuner(tuner_module) -> None:
    """Wraps llamafactory.train.tuner._training_function to add our Trainer callback (idempotent)."""
    if getattr(tuner_module, "_kt_patched", False):
        return
    original = tuner_module._training_function

    @functools.wraps(original)
    def _training_function(config):
        callbacks = config.get("callbacks")
        if callbacks is None:
            callbacks = config["callbacks"] = []
        callbacks.insert(0, _training_callback())  # first: LLaMA-Factory's own loggers see the figures
        return original(config)

    tuner_module._training_function = _training_function
    tuner_module._kt_patched = True


def _training_callback():
    """A Trainer callback for use_kt runs: the resume check, the experts out of FSDP2 / DeepSpeed, and
    kt_tokens_per_s / kt_cpu_expert_share."""
    from transformers import TrainerCallback

    from kt_core import ExpertTimer, KTExperts, pack_experts, speed_logs, training_releases_weights
    from kt_core.loading import check_training_checkpoint
    from kt_core.peft import expert_lora_parameters, warn_if_shape_dependent
    from kt_plugins.hf_trainer.engines import attach_deepspeed, prepare_engines, save_engine_state

    class KTTrainingCallback(TrainerCallback):
        timer: ExpertTimer | None = None

        def on_init_end(self, args, state, control, model=None, **kwargs):
            if model is None or not any(isinstance(m, KTExperts) for m in model.modules()):
                return
            # The checkpoint given, or the newest checkpoint-N LLaMA-Factory picked: checked before the
            # Trainer loads it, so that a folder left by a killed save is named with the last good one.
            if args.do_train and isinstance(args.resume_from_checkpoint, str):
                check_training_checkpoint(args.resume_from_checkpoint)
            prepare_engines(model, args)  # before the Trainer's accelerator prepares the model
            self.timer = ExpertTimer(model)

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if model is not None:  # packed kernels pack now, with a progress bar, not inside the first step
                settings = getattr(model, SETTINGS_ATTR, None)
                keep = settings is not None and settings.kt_keep_host_weights
                release = training_releases_weights(model, keep, args)
                pack_experts(model, progress=state.is_local_process_zero, release=release)
                streaming = getattr(model, "kt_streaming", None)
                if streaming is not None:  # streamed layers free theirs once their CPU operator packs
                    streaming.release_packed_weights = release
            if self.timer is not None:
                self.timer.start_steps()
            beside_deepspeed = attach_deepspeed(args, state, model, optimizer, caller="use_kt")  # own optimizer
            if model is not None and not beside_deepspeed:
                warn_if_shape_dependent(optimizer, expert_lora_parameters(model))

        def on_save(self, args, state, control, model=None, **kwargs):
            save_engine_state(args, state, model)

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            streaming = getattr(model, "kt_streaming", None)  # kt_plugins/llamafactory/model.py sets it
            if streaming is not None:
                streaming.set_steps_left(state.max_steps - state.global_step, args.gradient_accumulation_steps)

        def on_step_end(self, args, state, control, **kwargs):
            if self.timer is not None:
                self.timer.end_step()

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            streaming = getattr(model, "kt_streaming", None)  # kt_plugins/llamafactory/model.py sets it
            speed = speed_logs(self.timer, streaming) if self.timer is not None and logs is not None else None
            if speed is None:
                return
            logs.update(speed)  # the progress printer runs after this callback
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(speed)  # the Trainer copied `logs` there already
            logger.info("kt-plugins: %s", ", ".join(f"{k}={v}" for k, v in speed.items()))

        def on_train_end(self, args, state, control, **kwargs):
            if self.timer is not None:
                self.timer.stop_steps()

    return KTTrainingCallback()

"""LLaMA-Factory plugin: `use_kt: true` in a stock LLaMA-Factory YAML.

Installed with kt-plugins, a `.pth` startup line (boot.py) patches LLaMA-Factory's argument parser and
model loader as they are imported; nothing else is imported before LLaMA-Factory itself is (this package
file stays empty for that reason). Set `KT_LLAMAFACTORY=0` to turn the plugin off.

Files: boot.py (startup hook), config.py (our YAML keys), takeover.py (the patches), model.py (building
the model through kt_core), adapter.py (expert LoRA: attach, save, load).
"""

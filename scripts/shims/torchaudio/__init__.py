"""Stand-in for torchaudio in CPU-only environments (tests, CI), never shipped in the package.

PyPI's torchaudio wheels are CUDA builds that fail to load next to a CPU torch, and LLaMA-Factory imports
torchaudio at module level for its audio plugin. Text-only training never calls it.
"""

__version__ = "0.0.0+kt.shim"


def load(*args, **kwargs):
    raise RuntimeError("torchaudio is not installed in this environment (CPU shim): audio data is unsupported")


class functional:  # mirrors torchaudio.functional
    @staticmethod
    def resample(*args, **kwargs):
        raise RuntimeError("torchaudio is not installed in this environment (CPU shim): audio data is unsupported")

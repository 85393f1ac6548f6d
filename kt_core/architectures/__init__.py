"""Model families: one small declaration per family, registered through the `kt` plugin hook."""

from kt_core.architectures.registry import (
    UnknownArchitectureError,
    get_architecture,
    list_architectures,
    register_architecture,
    unregister_architecture,
)
from kt_core.architectures.spec import Architecture, ExpertProjections

__all__ = [
    "Architecture",
    "ExpertProjections",
    "UnknownArchitectureError",
    "get_architecture",
    "list_architectures",
    "register_architecture",
    "unregister_architecture",
]

"""A third-party model family for kt-plugins, discovered through the `kt` entry-point group.

It declares `olmoe` (OLMoE, a transformers >= 5 MoE family that kt-plugins does not ship) exactly
as an outside package would, and registers a trivial expert backend.
"""

from kt_core.architectures import Architecture
from kt_core.experts import KTExperts
from kt_core.hookspecs import hookimpl

FAKE_ARCHITECTURE = Architecture(name="fake_olmoe", model_types=("olmoe",), description="OLMoE (test plugin)")


class FakeExperts(KTExperts):
    """KTExperts under another name: proves a plugin backend can be named by a rule."""


@hookimpl
def register_architectures(register):
    register(FAKE_ARCHITECTURE)


@hookimpl
def register_expert_backends(register):
    register("fake_experts", FakeExperts)

"""Mixtral 8x7B / 8x22B.

Its checkpoints name the experts `model.layers.N.block_sparse_moe.experts.E.{w1,w3,w2}.weight`
(gate, up, down) and the router `block_sparse_moe.gate`; transformers 5 renames `block_sparse_moe`
to `mlp` (`MixtralSparseMoeBlock`, experts `MixtralExperts`), as its checkpoint conversion mapping does.
"""

from kt_core.architectures.spec import Architecture, ExpertProjections

ARCHITECTURE = Architecture(
    name="mixtral",
    model_types=("mixtral",),
    description="Mixtral-8x7B, Mixtral-8x22B",
    projections=ExpertProjections(gate="w1", up="w3", down="w2"),
    checkpoint_renames=((r"\.block_sparse_moe\.", ".mlp."),),
)

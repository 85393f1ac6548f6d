"""Several processes per node (torchrun, accelerate launch, LLaMA-Factory's FORCE_TORCHRUN): data parallelism with
the routed experts in host memory once per node.

ranks.py         this process's place among the ranks of its node (LOCAL_RANK / LOCAL_WORLD_SIZE)
shared_store.py  the frozen expert weights of every CPU-experts layer in one file under /dev/shm, written by local
                 rank 0 and mapped by every rank of the node (kt_core.load_model)
shared_packs.py  the packed kernels' copy of those weights (their tile layout) in a second such file: local rank 0
                 packs, every rank's operators borrow the tiles
cpus.py          each rank's share of the node's CPUs for its experts thread pool
ddp.py           the experts kept out of DistributedDataParallel (its own params-to-ignore hook): the frozen
                 weights, and the expert LoRA factors, whose gradients ExpertLoraAverager averages over gloo
deepspeed.py     the same tensors kept out of DeepSpeed (ZeRO-2 / ZeRO-3): out of the parameter registry before the
                 optimizer and the engine are built; the factors averaged and stepped beside ZeRO's step
fsdp.py          the same tensors kept out of FSDP2's sharding (its ignored_params; accelerate's ignored_modules),
                 the factors averaged by the same ExpertLoraAverager; the FSDP settings refused
"""

from kt_core.distributed.cpus import claim_cpu_share
from kt_core.distributed.ddp import ExpertLoraAverager, ignore_frozen_experts, prepare_data_parallel
from kt_core.distributed.deepspeed import DeepSpeedExpertLora, deepspeed_running, prepare_deepspeed
from kt_core.distributed.fsdp import fsdp_ignored_params, prepare_fsdp2
from kt_core.distributed.ranks import LocalRanks, local_ranks
from kt_core.distributed.shared_store import SharedExperts, SharedExpertsError

__all__ = [
    "DeepSpeedExpertLora",
    "ExpertLoraAverager",
    "LocalRanks",
    "SharedExperts",
    "SharedExpertsError",
    "claim_cpu_share",
    "deepspeed_running",
    "fsdp_ignored_params",
    "ignore_frozen_experts",
    "local_ranks",
    "prepare_data_parallel",
    "prepare_deepspeed",
    "prepare_fsdp2",
]

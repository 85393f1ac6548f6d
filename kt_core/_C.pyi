"""Types of kt_core._C, the compiled operator (csrc/bindings/module.cpp, csrc/bindings/bench.cpp).

Private: kt_core.kernels checks tensors and passes their data pointers (`*_ptr`, plain ints) here, so one
build serves any torch. Every entry point re-checks what it can see and raises ValueError instead of
crashing. dtype strings are "float32" or "bfloat16".

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank.
"""

from typing import TypedDict, final

# (rank r, scaling, gate_up_A [E, r, H], gate_up_B [E, 2I, r], down_A [E, r, I], down_B [E, H, r]): fp32 pointers.
_Lora = tuple[int, float, int, int, int, int]
# Gradient buffers of the four LoRA factors, same shapes and order as in _Lora.
_LoraGrads = tuple[int, int, int, int]

class _NumaTopology(TypedDict):
    libnuma: bool
    nodes: int
    cpus: list[int]
    cpu_node: list[int]

def cpu_features() -> dict[str, bool]:
    """CPUID and OS support: avx2, fma, avx512f/bw/vl, avx512_bf16, avx512_vnni, amx_tile/bf16/int8, os_amx."""

# The process-wide knobs of kt_core.config.RuntimeConfig that the C++ reads; kt_core.config hands them over.
def set_phase_times(on: bool) -> None:
    """Turns the per-phase wall-time booking of the packed forward and backward on or off (off by default)."""

def phase_times_enabled() -> bool:
    """Whether the per-phase wall times are being booked."""

def set_backward_weight_cache(keep: bool | None) -> None:
    """Whether the packed backward keeps a column-packed copy of the bf16 weights: always (True), never (False),
    or when it takes under a quarter of the free memory (None, the default)."""

def backward_weight_cache() -> bool | None:
    """The backward's weight-copy choice: True always, False never, None by free memory."""

def set_amx_emulation(on: bool) -> None:
    """Offers the AMX variants on CPUs without AMX, on a scalar model of the tile instructions (off by default)."""

def amx_emulation() -> bool:
    """Whether the AMX variants are offered on their scalar model where the CPU has no AMX."""

def reset_phase_times() -> None:
    """Forgets the booked phase times."""

def phase_times() -> list[tuple[str, float, int]]:
    """[(phase, seconds, calls)] booked since the last reset, in the order the phases were first seen."""

# Layouts Python sizes buffers by, computed by the C++ so that they have one definition.
def cache_row_floats(intermediate: int, rank: int, dtype: str) -> int:
    """fp32 elements per routed row of the forward's cache for the backward, for activations of `dtype`
    (rank 0 without LoRA; csrc/moe/experts_op.h: ForwardCache)."""

def kernel_variants() -> list[tuple[str, bool, str, bool]]:
    """[(name, runnable, why not when not runnable, quantized)] of every kernel variant, best first."""

def numa_topology() -> _NumaTopology:
    """The CPUs this process may use and their NUMA nodes (libnuma opened at run time when installed)."""

class ThreadPool:
    """The `cpu_infer` threads, the caller included: N threads run N - 1 workers, pinned to the last CPUs."""

    def __init__(self, num_threads: int, pin: bool = True) -> None:
        """Starts num_threads - 1 workers (num_threads >= 1); pin=False leaves them to the scheduler."""

    @property
    def num_threads(self) -> int:
        """Threads of the pool, the calling thread included."""

    @property
    def pinned_cpus(self) -> list[int]:
        """CPU of each worker; empty when not pinned (pin=False, or more threads than CPUs)."""

class StreamForward:
    """An experts forward over fixed buffers, run as a host function on a CUDA stream (capturable)."""

    def enqueue(self, launch_host_func: int, stream: int) -> None:
        """One run on `stream` through cuLaunchHostFunc at address `launch_host_func`; RuntimeError if refused."""

    @property
    def error(self) -> str:
        """What the last failed run threw ('' if none); a failed run leaves NaN in y."""

    @property
    def runs(self) -> int:
        """Runs that completed."""

class ExpertsOp:
    """One layer's routed experts on the CPU: weights gate_up [E, 2I, H] and down [E, H, I], borrowed by pointer."""

    def __init__(
        self,
        kernel: str,
        num_experts: int,
        hidden: int,
        intermediate: int,
        gate_up_ptr: int,
        down_ptr: int,
        dtype: str,
    ) -> None:
        """Binds the weights (which must outlive the op) to a kernel variant named by kernel_variants()."""

    def forward(
        self,
        pool: ThreadPool,
        T: int,
        K: int,
        x_ptr: int,
        dtype: str,
        ids_ptr: int,
        w_ptr: int,
        y_ptr: int,
        cache_ptr: int,
        lora: _Lora | None,
    ) -> None:
        """y [T, H] (dtype of x) = sum_k w [T, K] * expert ids [T, K] (int64) of x [T, H]; fills the cache if given."""

    def stream_forward(
        self,
        pool: ThreadPool,
        T: int,
        K: int,
        x_ptr: int,
        dtype: str,
        ids_ptr: int,
        w_ptr: int,
        y_ptr: int,
        lora: _Lora | None,
        chunk: int,
    ) -> StreamForward:
        """The forward above over fixed buffers (borrowed), to enqueue on a CUDA stream; chunk 0: whole batch."""

    def backward(
        self,
        pool: ThreadPool,
        T: int,
        K: int,
        x_ptr: int,
        dtype: str,
        ids_ptr: int,
        w_ptr: int,
        dy_ptr: int,
        dx_ptr: int,
        dw_ptr: int,
        cache_ptr: int,
        lora: _Lora | None,
        lora_grads: _LoraGrads | None,
    ) -> None:
        """dx [T, H], dw [T, K] fp32 and, with lora, its four factor gradients; cache_ptr 0 recomputes the forward."""

    def pack(self, pool: ThreadPool) -> None:
        """Packs (and for quantized kernels quantizes) the weights into the kernel's tile layout."""

    @property
    def kernel(self) -> str:
        """The kernel variant's name."""

    @property
    def quantization_error(self) -> tuple[float, float]:
        """(gate_up, down) relative error of the quantized weights; zeros for unquantized kernels."""

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed buffers (0 before pack() or load_packed())."""

    @property
    def packs(self) -> bool:
        """Whether pack() packs anything for this kernel and weight dtype."""

    @property
    def packed_format(self) -> str:
        """Layout tag of the packed buffers ('' when nothing is packed)."""

    @property
    def pack_count(self) -> int:
        """Times pack() packed the weights (loading saved buffers does not count)."""

    def packed_blobs(self) -> list[tuple[str, int, int]]:
        """[(name, address, nbytes)] of the packed buffers (empty before pack() or load_packed())."""

    def packed_layout(self) -> list[tuple[str, int]]:
        """[(name, nbytes)] of the buffers pack() would make."""

    def load_packed(
        self,
        format: str,
        blobs: list[tuple[str, int, int]],
        gate_up_error: float,
        down_error: float,
        borrow: bool = False,
    ) -> None:
        """Copies saved packed buffers [(name, address, nbytes)] in instead of packing; ValueError on any mismatch.
        borrow=True keeps pointers to the tiles ('*.data', 64-byte aligned) instead: the caller keeps them alive."""

    @property
    def packed_borrowed(self) -> bool:
        """Whether the packed tiles are borrowed (load_packed(..., borrow=True)), not owned by the op."""

# A submodule at run time (pybind11 def_submodule, csrc/bindings/bench.cpp); typed as a namespace so that
# the stub stays one file. Probes for benchmarks/ and tests: kt_core never calls them.
@final
class bench:
    """Probes of the thread pool and the machine, for benchmarks and tests."""

    @staticmethod
    def run_empty(pool: ThreadPool, tasks: int) -> None:
        """One job of empty tasks on the pool: the pool's own overhead."""

    @staticmethod
    def read_sum(pool: ThreadPool, ptr: int, nbytes: int) -> int:
        """Wrapping sum of the 8-byte words at ptr, read by the pool: a read-bandwidth probe."""

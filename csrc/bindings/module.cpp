// kt_core._C: the one binding module. It takes raw data pointers and shapes (no libtorch linkage, so
// one build serves any torch); kt_core/kernels.py validates tensors and passes their pointers here.
// Every entry point re-checks what it can see and raises ValueError instead of crashing.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "../moe/experts_op.h"
#include "../moe/kernel_registry.h"
#include "../runtime/cpu_features.h"
#include "../runtime/numa.h"
#include "../runtime/phase_times.h"
#include "../runtime/thread_pool.h"
#include "bench.h"
#include "stream_forward.h"

namespace py = pybind11;
using kt::DType;

namespace {

using LoraTuple = std::tuple<int, float, uintptr_t, uintptr_t, uintptr_t, uintptr_t>;
using LoraGradTuple = std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t>;

DType parse_dtype(const std::string& name, const char* what) {
  if (name == "float32") return DType::kF32;
  if (name == "bfloat16") return DType::kBF16;
  throw std::invalid_argument(std::string(what) + ": dtype must be 'float32' or 'bfloat16', got '" + name + "'");
}

// Expert weights: the activation dtypes, or block-quantized fp8 (torch.float8_e4m3fn).
DType parse_weight_dtype(const std::string& name) {
  if (name == "float8_e4m3fn") return DType::kFP8E4M3;
  if (name == "float32" || name == "bfloat16") return parse_dtype(name, "expert weights");
  throw std::invalid_argument("expert weights: dtype must be 'float32', 'bfloat16' or 'float8_e4m3fn', got '" + name +
                              "'");
}

template <typename T>
T* pointer(uintptr_t address, const char* what) {
  if (address == 0) throw std::invalid_argument(std::string("experts: null pointer for ") + what);
  return reinterpret_cast<T*>(address);
}

kt::LoraFactors parse_lora(const std::optional<LoraTuple>& lora) {
  kt::LoraFactors f;
  if (!lora) return f;
  f.rank = std::get<0>(*lora);
  if (f.rank <= 0) throw std::invalid_argument("experts: LoRA rank must be positive");
  f.scaling = std::get<1>(*lora);
  f.gate_up_a = pointer<const float>(std::get<2>(*lora), "lora gate_up_A");
  f.gate_up_b = pointer<const float>(std::get<3>(*lora), "lora gate_up_B");
  f.down_a = pointer<const float>(std::get<4>(*lora), "lora down_A");
  f.down_b = pointer<const float>(std::get<5>(*lora), "lora down_B");
  return f;
}

kt::Activations parse_activations(int T, int K, const std::string& dtype, uintptr_t x, uintptr_t ids, uintptr_t w) {
  if (T < 0 || K < 1) throw std::invalid_argument("experts: need T >= 0 tokens and K >= 1 experts per token");
  kt::Activations a;
  a.T = T;
  a.K = K;
  a.dtype = parse_dtype(dtype, "hidden_states");
  if (T > 0) {
    a.x = pointer<const void>(x, "hidden_states");
    a.ids = pointer<const int64_t>(ids, "top_k_index");
    a.w = pointer<const float>(w, "top_k_weights");
  }
  return a;
}

kt::ExpertWeights expert_weights(int num_experts, int hidden, int intermediate, uintptr_t gate_up, uintptr_t down,
                                 const std::string& dtype, uintptr_t gate_up_scale, uintptr_t down_scale,
                                 std::pair<int, int> block) {
  kt::ExpertWeights w{num_experts,
                      hidden,
                      intermediate,
                      pointer<const void>(gate_up, "gate_up_proj"),
                      pointer<const void>(down, "down_proj"),
                      parse_weight_dtype(dtype)};
  if (w.dtype == DType::kFP8E4M3) {
    w.gate_up_scale = pointer<const float>(gate_up_scale, "gate_up_proj_scale_inv");
    w.down_scale = pointer<const float>(down_scale, "down_proj_scale_inv");
    w.block_rows = block.first;
    w.block_cols = block.second;
  }
  return w;
}

class PyExpertsOp {
 public:
  PyExpertsOp(const std::string& kernel, int num_experts, int hidden, int intermediate, uintptr_t gate_up,
              uintptr_t down, const std::string& dtype, uintptr_t gate_up_scale, uintptr_t down_scale,
              std::pair<int, int> block)
      : kernel_(kernel),
        variant_(kt::find_variant(kernel)),
        op_(expert_weights(num_experts, hidden, intermediate, gate_up, down, dtype, gate_up_scale, down_scale, block),
            variant_.kernels, variant_.packed, variant_.fp8) {}

  void pack(kt::ThreadPool& pool) {
    py::gil_scoped_release release;
    op_.pack(pool);
  }

  void forward(kt::ThreadPool& pool, int T, int K, uintptr_t x, const std::string& dtype, uintptr_t ids, uintptr_t w,
               uintptr_t y, uintptr_t cache, const std::optional<LoraTuple>& lora) {
    const kt::Activations a = parse_activations(T, K, dtype, x, ids, w);
    const kt::LoraFactors f = parse_lora(lora);
    if (T == 0) return;
    void* out = pointer<void>(y, "output");
    py::gil_scoped_release release;
    op_.forward(pool, a, f, out, reinterpret_cast<float*>(cache));
  }

  // The forward above, fixed to these buffers, to enqueue on a CUDA stream (see stream_forward.h).
  kt::StreamForward* stream_forward(kt::ThreadPool& pool, int T, int K, uintptr_t x, const std::string& dtype,
                                    uintptr_t ids, uintptr_t w, uintptr_t y, const std::optional<LoraTuple>& lora,
                                    int chunk) {
    if (T < 1) throw std::invalid_argument("experts: a stream forward needs T >= 1 tokens");
    return new kt::StreamForward(op_, pool, parse_activations(T, K, dtype, x, ids, w), parse_lora(lora),
                                 pointer<void>(y, "output"), chunk);
  }

  void backward(kt::ThreadPool& pool, int T, int K, uintptr_t x, const std::string& dtype, uintptr_t ids, uintptr_t w,
                uintptr_t dy, uintptr_t dx, uintptr_t dw, uintptr_t cache, const std::optional<LoraTuple>& lora,
                const std::optional<LoraGradTuple>& grads) {
    const kt::Activations a = parse_activations(T, K, dtype, x, ids, w);
    const kt::LoraFactors f = parse_lora(lora);
    kt::LoraGrads g;
    if (f.rank > 0) {
      if (!grads) throw std::invalid_argument("experts: LoRA factors given without gradient buffers");
      g.gate_up_a = pointer<float>(std::get<0>(*grads), "grad gate_up_A");
      g.gate_up_b = pointer<float>(std::get<1>(*grads), "grad gate_up_B");
      g.down_a = pointer<float>(std::get<2>(*grads), "grad down_A");
      g.down_b = pointer<float>(std::get<3>(*grads), "grad down_B");
    }
    if (T == 0 && f.rank == 0) return;
    const void* dy_p = T > 0 ? pointer<const void>(dy, "grad_output") : nullptr;
    void* dx_p = T > 0 ? pointer<void>(dx, "grad_input") : nullptr;
    float* dw_p = T > 0 ? pointer<float>(dw, "grad_weights") : nullptr;
    py::gil_scoped_release release;
    op_.backward(pool, a, f, dy_p, dx_p, dw_p, reinterpret_cast<const float*>(cache), g);
  }

  // (name, address, bytes) of each packed buffer; the addresses live as long as the op and its packing.
  py::list packed_blobs() {
    py::list out;
    for (const auto& b : op_.packed_blobs())
      out.append(py::make_tuple(b.name, reinterpret_cast<uintptr_t>(b.data), b.bytes));
    return out;
  }

  py::list packed_layout() const {
    py::list out;
    for (const auto& b : op_.packed_layout()) out.append(py::make_tuple(b.name, b.bytes));
    return out;
  }

  void load_packed(const std::string& tag, const std::vector<std::tuple<std::string, uintptr_t, size_t>>& blobs,
                   double gate_up_error, double down_error, bool borrow) {
    std::vector<kt::ExpertsOp::PackedBlob> in;
    in.reserve(blobs.size());
    for (const auto& [name, address, bytes] : blobs) in.push_back({name, reinterpret_cast<uint8_t*>(address), bytes});
    py::gil_scoped_release release;
    op_.load_packed(tag, in, gate_up_error, down_error, borrow);
  }

  const std::string& kernel() const { return kernel_; }
  const kt::ExpertsOp& op() const { return op_; }
  kt::ExpertsOp& op() { return op_; }

 private:
  std::string kernel_;
  kt::KernelVariant variant_;
  kt::ExpertsOp op_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kt-plugins CPU kernels (private: use kt_core.kernels)";

  m.def("cpu_features", [] {
    const kt::CpuFeatures& f = kt::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512_bf16"] = f.avx512_bf16;
    d["avx512_vnni"] = f.avx512_vnni;
    d["amx_tile"] = f.amx_tile;
    d["amx_bf16"] = f.amx_bf16;
    d["amx_int8"] = f.amx_int8;
    d["os_amx"] = f.os_amx;
    return d;
  });

  // The process-wide knobs of kt_core.config.RuntimeConfig that the C++ reads: Python hands them over when the
  // config is first read and whenever it changes (configure(), a KT_* variable set later).
  m.def("set_phase_times", &kt::set_phase_times, py::arg("on"));
  m.def("phase_times_enabled", &kt::phase_times_enabled);
  m.def("set_backward_weight_cache", &kt::set_backward_weight_cache, py::arg("keep"));
  m.def("backward_weight_cache", &kt::backward_weight_cache);
  m.def("set_amx_emulation", &kt::set_amx_emulation, py::arg("on"));
  m.def("amx_emulation", &kt::amx_emulation);

  m.def("reset_phase_times", &kt::reset_phase_times);
  m.def("phase_times", [] {
    py::list out;
    for (const auto& p : kt::phase_times()) out.append(py::make_tuple(p.name, p.seconds, p.calls));
    return out;
  });

  // Layouts Python sizes buffers by, computed here so that they have one definition.
  m.def(
      "cache_row_floats",
      [](int intermediate, int rank, const std::string& dtype) {
        if (intermediate <= 0 || rank < 0)
          throw std::invalid_argument("cache_row_floats: need intermediate > 0 and rank >= 0");
        return kt::ForwardCache::row_floats(intermediate, rank, parse_dtype(dtype, "activations"));
      },
      py::arg("intermediate"), py::arg("rank"), py::arg("dtype"),
      "fp32 elements per routed row of the forward's cache for the backward (experts_op.h: ForwardCache).");

  m.def("kernel_variants", [] {
    py::list out;
    for (const auto& k : kt::kernel_variants()) out.append(py::make_tuple(k.name, k.runnable, k.missing, k.quantized));
    return out;
  });

  // fp8 weights: the packed variants first (they convert e4m3 to bf16 once per packed row and run the bf16 dot
  // products), then the unpacked ones (e4m3 to fp32 in registers), each group in kernel_variants()'s order.
  m.def("fp8_kernels", [] {
    py::list out;
    for (const bool packed : {true, false})
      for (const auto& k : kt::kernel_variants())
        if (k.runnable && k.fp8 && (k.packed != nullptr) == packed) out.append(k.name);
    return out;
  });

  m.def("numa_topology", [] {
    const kt::NumaTopology& t = kt::numa_topology();
    py::dict d;
    d["libnuma"] = t.libnuma;
    d["nodes"] = t.nodes;
    d["cpus"] = t.cpus;
    d["cpu_node"] = t.cpu_node;
    return d;
  });

  py::class_<kt::ThreadPool>(m, "ThreadPool")
      .def(py::init([](int n, bool pin) {
             if (n < 1) throw std::invalid_argument("ThreadPool: num_threads must be >= 1");
             return new kt::ThreadPool(n, pin);
           }),
           py::arg("num_threads"), py::arg("pin") = true)
      .def_property_readonly("num_threads", &kt::ThreadPool::num_threads)
      .def_property_readonly("pinned_cpus", &kt::ThreadPool::pinned_cpus);
  kt::bind_bench(m);

  py::class_<kt::StreamForward>(m, "StreamForward")
      .def("enqueue", &kt::StreamForward::enqueue, py::arg("launch_host_func"), py::arg("stream"),
           "Enqueues one run on the CUDA stream `stream` through cuLaunchHostFunc at `launch_host_func`.")
      .def_property_readonly("error", &kt::StreamForward::error, "What the last failed run threw ('' if none).")
      .def_property_readonly("runs", &kt::StreamForward::runs, "Runs that completed.");

  py::class_<PyExpertsOp>(m, "ExpertsOp")
      .def(py::init<const std::string&, int, int, int, uintptr_t, uintptr_t, const std::string&, uintptr_t, uintptr_t,
                    std::pair<int, int>>(),
           py::arg("kernel"), py::arg("num_experts"), py::arg("hidden"), py::arg("intermediate"),
           py::arg("gate_up_ptr"), py::arg("down_ptr"), py::arg("dtype"), py::arg("gate_up_scale_ptr") = 0,
           py::arg("down_scale_ptr") = 0, py::arg("block") = std::pair<int, int>(128, 128))
      .def("forward", &PyExpertsOp::forward, py::arg("pool"), py::arg("T"), py::arg("K"), py::arg("x_ptr"),
           py::arg("dtype"), py::arg("ids_ptr"), py::arg("w_ptr"), py::arg("y_ptr"), py::arg("cache_ptr"),
           py::arg("lora"))
      .def("backward", &PyExpertsOp::backward, py::arg("pool"), py::arg("T"), py::arg("K"), py::arg("x_ptr"),
           py::arg("dtype"), py::arg("ids_ptr"), py::arg("w_ptr"), py::arg("dy_ptr"), py::arg("dx_ptr"),
           py::arg("dw_ptr"), py::arg("cache_ptr"), py::arg("lora"), py::arg("lora_grads"))
      .def("stream_forward", &PyExpertsOp::stream_forward, py::arg("pool"), py::arg("T"), py::arg("K"),
           py::arg("x_ptr"), py::arg("dtype"), py::arg("ids_ptr"), py::arg("w_ptr"), py::arg("y_ptr"), py::arg("lora"),
           py::arg("chunk"), py::keep_alive<0, 1>(), py::keep_alive<0, 2>(),
           "A StreamForward over these buffers (borrowed: keep them alive as long as it).")
      .def("pack", &PyExpertsOp::pack, py::arg("pool"))
      .def_property_readonly("kernel", &PyExpertsOp::kernel)
      .def_property_readonly(
          "quantization_error",
          [](const PyExpertsOp& o) { return py::make_tuple(o.op().gate_up_error(), o.op().down_error()); })
      .def_property_readonly("packed_bytes", [](const PyExpertsOp& o) { return o.op().packed_bytes(); })
      .def_property_readonly(
          "packs", [](const PyExpertsOp& o) { return o.op().packs(); },
          "Whether pack() packs anything for this kernel and weight dtype.")
      .def_property_readonly(
          "packed_format", [](const PyExpertsOp& o) { return o.op().packed_format_tag(); },
          "Layout tag of the packed buffers ('' when nothing is packed).")
      .def_property_readonly(
          "pack_count", [](const PyExpertsOp& o) { return o.op().pack_count(); },
          "Times pack() packed the weights (loading saved buffers does not count).")
      .def("packed_blobs", &PyExpertsOp::packed_blobs,
           "[(name, address, nbytes)] of the packed buffers (empty before pack() or load_packed()).")
      .def("packed_layout", &PyExpertsOp::packed_layout, "[(name, nbytes)] of the buffers pack() would make.")
      .def("load_packed", &PyExpertsOp::load_packed, py::arg("format"), py::arg("blobs"), py::arg("gate_up_error"),
           py::arg("down_error"), py::arg("borrow") = false,
           "Copies saved packed buffers [(name, address, nbytes)] in instead of packing; ValueError when the format "
           "tag, the names or the sizes do not match. borrow=True keeps pointers to the tiles ('*.data', 64-byte "
           "aligned) instead of copying them: the caller keeps those bytes alive and unchanged for the op's life.")
      .def(
          "release_weights", [](PyExpertsOp& o) { o.op().release_weights(); },
          "Forgets the weights' addresses once packed, so that their owner may free them: the packed forward and "
          "backward read their own copy; calls off the packed path and pack() raise RuntimeError afterwards.")
      .def_property_readonly(
          "weights_released", [](const PyExpertsOp& o) { return o.op().weights_released(); },
          "Whether release_weights() was called.")
      .def(
          "unpack_weights",
          [](PyExpertsOp& o, kt::ThreadPool& pool, uintptr_t gate_up, uintptr_t down, bool adopt) {
            void* gu = pointer<void>(gate_up, "gate_up");
            void* d = pointer<void>(down, "down");
            py::gil_scoped_release release;
            o.op().unpack_weights(pool, gu, d, adopt);
          },
          py::arg("pool"), py::arg("gate_up_ptr"), py::arg("down_ptr"), py::arg("adopt"),
          "Writes the weights back from the packed copy (bf16 / fp8 formats: exact) into [E, 2I, H] and [E, H, I] "
          "buffers of the weights' dtype; adopt=True makes the op read them from there on. RuntimeError for the "
          "int8 / int4 formats.")
      .def(
          "packed_forward",
          [](const PyExpertsOp& o, const std::string& dtype) {
            return o.op().packed_forward(parse_dtype(dtype, "activations"));
          },
          py::arg("dtype"),
          "Whether a forward with these activations ('float32' / 'bfloat16') runs on the packed tiles alone.")
      .def(
          "packed_backward",
          [](const PyExpertsOp& o, const std::string& dtype) {
            return o.op().packed_backward(parse_dtype(dtype, "activations"));
          },
          py::arg("dtype"),
          "Whether a backward with these activations ('float32' / 'bfloat16') runs on the packed tiles alone (no "
          "read of the weights: it works after release_weights()).")
      .def_property_readonly(
          "packed_borrowed", [](const PyExpertsOp& o) { return o.op().packed_borrowed(); },
          "Whether the packed tiles are borrowed (load_packed(..., borrow=True)), not owned by the op.");
}

// What the AMX bf16 tile loop reaches on this machine, apart from the rest of the experts' forward: one
// projection of a MoE layer (every expert, its routed rows, its packed weights streamed from DRAM once) with
// the loop orders the packed panels could use. Prints TFLOPS per variant, alternated over rounds so that a
// machine whose speed drifts affects every variant alike.
//
//   g++ -O3 -march=sapphirerapids -std=c++17 -pthread benchmarks/amx_tile_micro.cpp -o /tmp/amx_tile_micro
//   /tmp/amx_tile_micro --threads 15 --rounds 3 [--variants stream,prefetch] [--strides aligned|odd|both]
//
// Variants (C: a 32 x 32 fp32 block in tiles 0-3, A: 32 activation rows in tiles 4-5, B: a packed weight pair
// in tiles 6-7; "chunk": k-blocks per pass over the other operand):
//   stream     for each pair, for each 32 rows: the whole k loop (A and B both from L2)
//   a_resident for each 32 rows, for each k chunk: A chunk in L1, every pair's C loaded / stored around it
//   b_resident for each pair, for each k chunk: B chunk in L1, every 32 rows' C loaded / stored around it
//   interleaved  stream with each tile product issued as soon as its operands are loaded
//   prefetch   stream, the first 32 rows of a pair prefetching the next pair into L2
//   l1_peak    the same number of tile products on operands that stay in L1: the ceiling
#include <immintrin.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "../csrc/moe/amx_panels.h"

namespace {

using bf16 = uint16_t;

void configure_tiles() {
  const kt::TileConfig cfg = kt::tile_config();  // the packed panels' configuration: 8 tiles of 16 x 64 bytes
  _tile_loadconfig(&cfg);
}

struct Shape {
  const char* name;
  int experts, rows, k, pairs;  // rows per expert, k inputs, pairs of 16-column tiles (32 output columns)
};

struct Layer {
  Shape s;
  int k_blocks, lda;          // lda: activation row stride in elements (k rounded up, or one line more)
  std::vector<bf16> a;        // [experts * rows][lda]
  std::vector<bf16> w;        // [experts][pairs][2][k_blocks][16 x 32]
  int64_t pair_elems() const { return 2LL * k_blocks * 512; }
  const bf16* pair(int e, int p) const { return w.data() + (static_cast<int64_t>(e) * s.pairs + p) * pair_elems(); }
  const bf16* rows(int e, int m) const { return a.data() + (static_cast<int64_t>(e) * s.rows + m) * lda; }
};

constexpr int kRowChunk = 128;
constexpr int kPairsPerTask = 4;

inline void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}
inline void load_c(const float* c) {
  _tile_loadd(0, c, 128);
  _tile_loadd(1, c + 16, 128);
  _tile_loadd(2, c + 512, 128);
  _tile_loadd(3, c + 512 + 16, 128);
}
inline void store_c(float* c) {
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 512, 128);
  _tile_stored(3, c + 512 + 16, 128);
}
// k block kb of 32 rows (am: rows 0-15, am16: rows 16-31) x one pair, as the packed panels order it.
inline void k_step(const bf16* am, const bf16* am16, int64_t stride, const bf16* b0, const bf16* b1, int kb) {
  _tile_loadd(6, b0 + kb * 512LL, 64);
  _tile_loadd(7, b1 + kb * 512LL, 64);
  _tile_loadd(4, am + kb * 32, stride);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_loadd(5, am16 + kb * 32, stride);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// k blocks [kb0, kb1) of 32 rows x one pair.
inline void k_steps(const bf16* am, int64_t stride, const bf16* b0, const bf16* b1, int kb0, int kb1, int lda) {
  for (int kb = kb0; kb < kb1; ++kb) k_step(am, am + 16LL * lda, stride, b0, b1, kb);
}

// The same k steps with each tile product issued as soon as its two operands are loaded.
inline void k_steps_interleaved(const bf16* am, int64_t stride, const bf16* b0, const bf16* b1, int kb0, int kb1,
                                int lda) {
  const bf16* am16 = am + 16LL * lda;
  for (int kb = kb0; kb < kb1; ++kb) {
    _tile_loadd(4, am + kb * 32, stride);
    _tile_loadd(6, b0 + kb * 512LL, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b1 + kb * 512LL, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, am16 + kb * 32, stride);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// k steps of the first 32 rows that also prefetch the next pair (2 KB per step) into L2.
inline void k_steps_prefetch(const bf16* am, int64_t stride, const bf16* b0, const bf16* b1, int kb1, int lda,
                             const bf16* next) {
  for (int kb = 0; kb < kb1; ++kb) {
    const char* pf = reinterpret_cast<const char*>(next) + kb * 2048LL;
    for (int l = 0; l < 2048; l += 64) _mm_prefetch(pf + l, _MM_HINT_T1);
    k_step(am, am + 16LL * lda, stride, b0, b1, kb);
  }
}

// One task: rows [m0, m0 + mrows) of expert e (a multiple of 32) against pairs [p0, p1). c: [pairs][mrows][32].
using KSteps = void (*)(const bf16*, int64_t, const bf16*, const bf16*, int, int, int);

// For each pair, for each 32 rows: the whole k loop, with the given order of loads and tile products.
template <KSteps steps>
void task_pairs_outer(const Layer& L, int e, int m0, int mrows, int p0, int p1, float* c, int) {
  const int lda = L.lda, kb = L.k_blocks;
  for (int p = p0; p < p1; ++p) {
    const bf16* b0 = L.pair(e, p);
    for (int m = 0; m < mrows; m += 32) {
      zero_c();
      steps(L.rows(e, m0 + m), lda * 2, b0, b0 + kb * 512LL, 0, kb, lda);
      store_c(c + ((p - p0) * mrows + m) * 32);
    }
  }
}

void task_prefetch(const Layer& L, int e, int m0, int mrows, int p0, int p1, float* c, int) {
  const int lda = L.lda, kb = L.k_blocks;
  for (int p = p0; p < p1; ++p) {
    const bf16* b0 = L.pair(e, p);
    for (int m = 0; m < mrows; m += 32) {
      zero_c();
      if (m == 0 && p + 1 < p1)
        k_steps_prefetch(L.rows(e, m0 + m), lda * 2, b0, b0 + kb * 512LL, kb, lda, L.pair(e, p + 1));
      else
        k_steps(L.rows(e, m0 + m), lda * 2, b0, b0 + kb * 512LL, 0, kb, lda);
      store_c(c + ((p - p0) * mrows + m) * 32);
    }
  }
}

void task_a_resident(const Layer& L, int e, int m0, int mrows, int p0, int p1, float* c, int chunk) {
  const int lda = L.lda, kb = L.k_blocks;
  for (int m = 0; m < mrows; m += 32) {
    for (int k0 = 0; k0 < kb; k0 += chunk) {
      const int k1 = std::min(kb, k0 + chunk);
      for (int p = p0; p < p1; ++p) {
        float* cp = c + ((p - p0) * mrows + m) * 32;
        if (k0 == 0)
          zero_c();
        else
          load_c(cp);
        const bf16* b0 = L.pair(e, p);
        k_steps(L.rows(e, m0 + m), lda * 2, b0, b0 + kb * 512LL, k0, k1, lda);
        store_c(cp);
      }
    }
  }
}

void task_b_resident(const Layer& L, int e, int m0, int mrows, int p0, int p1, float* c, int chunk) {
  const int lda = L.lda, kb = L.k_blocks;
  for (int p = p0; p < p1; ++p) {
    const bf16* b0 = L.pair(e, p);
    for (int k0 = 0; k0 < kb; k0 += chunk) {
      const int k1 = std::min(kb, k0 + chunk);
      for (int m = 0; m < mrows; m += 32) {
        float* cp = c + ((p - p0) * mrows + m) * 32;
        if (k0 == 0)
          zero_c();
        else
          load_c(cp);
        k_steps(L.rows(e, m0 + m), lda * 2, b0, b0 + kb * 512LL, k0, k1, lda);
        store_c(cp);
      }
    }
  }
}

// The ceiling: the same number of k steps on 4 k-blocks of one pair and 32 rows, all in L1.
void task_l1_peak(const Layer& L, int e, int, int mrows, int p0, int p1, float* c, int) {
  const int lda = L.lda, kb = L.k_blocks;
  const bf16* b0 = L.pair(e, p0);
  for (int p = p0; p < p1; ++p)
    for (int m = 0; m < mrows; m += 32) {
      zero_c();
      for (int k0 = 0; k0 < kb; k0 += 4)
        k_steps(L.rows(e, 0), lda * 2, b0, b0 + kb * 512LL, 0, std::min(4, kb - k0), lda);
      store_c(c);
    }
}

using TaskFn = void (*)(const Layer&, int, int, int, int, int, float*, int);

struct Variant {
  std::string name;
  TaskFn fn;
  int chunk;
};

void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  sched_setaffinity(0, sizeof(set), &set);
}

double run_layer(const Layer& L, const Variant& v, int threads) {
  const int groups = (L.s.pairs + kPairsPerTask - 1) / kPairsPerTask;
  const int64_t tasks = static_cast<int64_t>(L.s.experts) * groups;
  std::atomic<int64_t> next{0};
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  auto worker = [&](int id) {
    pin(id);
    syscall(SYS_arch_prctl, 0x1023, 18);
    configure_tiles();
    std::vector<float> c(static_cast<size_t>(kPairsPerTask) * kRowChunk * 32 + 16);
    ready.fetch_add(1);
    while (!go.load(std::memory_order_acquire)) {
    }
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      const int e = static_cast<int>(t / groups), p0 = static_cast<int>(t % groups) * kPairsPerTask;
      const int p1 = std::min(L.s.pairs, p0 + kPairsPerTask);
      for (int m0 = 0; m0 < L.s.rows; m0 += kRowChunk)
        v.fn(L, e, m0, std::min(kRowChunk, L.s.rows - m0), p0, p1, c.data(), v.chunk);
    }
    _tile_release();
  };
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) pool.emplace_back(worker, i);
  while (ready.load() < threads) {
  }
  const auto t0 = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  for (auto& t : pool) t.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double flops = 2.0 * L.s.experts * L.s.rows * L.s.k * L.s.pairs * 32;
  return flops / s / 1e12;
}

// odd_lines: a row stride of an odd number of 64-byte lines, so that the 16 rows of a tile fall in 16
// different L1 sets (a stride of 4 KB puts them all in one 12-way set).
Layer make_layer(const Shape& s, bool odd_lines) {
  const int k_blocks = (s.k + 31) / 32;
  const int lda = k_blocks * 32 + (odd_lines && k_blocks % 2 == 0 ? 32 : 0);
  Layer L{s, k_blocks, lda, {}, {}};
  L.a.resize(static_cast<size_t>(s.experts) * s.rows * lda);
  L.w.resize(static_cast<size_t>(s.experts) * s.pairs * L.pair_elems());
  uint32_t x = 12345;
  auto next = [&]() {
    x = x * 1664525u + 1013904223u;
    return static_cast<bf16>(0x3c00 + ((x >> 16) & 0x3ff));  // bf16 in [2^-7, 2^-6): no denormals
  };
  for (auto& v : L.a) v = next();
  for (auto& v : L.w) v = next();
  return L;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 15, rounds = 3;
  std::string only, strides = "both";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--rounds")) rounds = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--variants")) only = argv[i + 1];      // comma list; default: all
    if (!std::strcmp(argv[i], "--strides")) strides = argv[i + 1];    // aligned | odd | both
  }
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
    std::fprintf(stderr, "AMX tile data not granted by the OS\n");
    return 1;
  }
  // Rows per expert under balanced routing: T * K / E.
  const Shape shapes[] = {
      {"dsv2-lite gate_up T=1024", 64, 96, 2048, 88},       {"dsv2-lite down T=1024", 64, 96, 1408, 64},
      {"dsv2-lite gate_up T=4096", 64, 384, 2048, 88},      {"dsv2-lite down T=4096", 64, 384, 1408, 64},
      {"qwen3-30b-a3b gate_up T=1024", 128, 64, 2048, 48},  {"qwen3-30b-a3b down T=1024", 128, 64, 768, 64},
      {"qwen3-30b-a3b gate_up T=4096", 128, 256, 2048, 48}, {"qwen3-30b-a3b down T=4096", 128, 256, 768, 64},
  };
  const std::vector<Variant> all = {
      {"stream", task_pairs_outer<k_steps>, 0}, {"interleaved", task_pairs_outer<k_steps_interleaved>, 0},
      {"prefetch", task_prefetch, 0},           {"a_resident/8", task_a_resident, 8},
      {"a_resident/16", task_a_resident, 16},   {"b_resident/8", task_b_resident, 8},
      {"b_resident/16", task_b_resident, 16},   {"l1_peak", task_l1_peak, 0},
  };
  std::vector<Variant> variants;
  for (const Variant& v : all)
    if (only.empty() || ("," + only + ",").find("," + v.name + ",") != std::string::npos) variants.push_back(v);
  std::vector<bool> odd_strides;
  if (strides != "odd") odd_strides.push_back(false);
  if (strides != "aligned") odd_strides.push_back(true);
  for (const Shape& s : shapes) {
    for (bool odd : odd_strides) {
      Layer L = make_layer(s, odd);
      for (int th : {1, threads}) {
        std::vector<std::vector<double>> tf(variants.size());
        run_layer(L, variants[0], th);  // warm the pages
        for (int r = 0; r < rounds; ++r)
          for (size_t v = 0; v < variants.size(); ++v) tf[v].push_back(run_layer(L, variants[v], th));
        std::printf("%s, row stride %d B, %d thread(s): TFLOPS median (best)\n", s.name, L.lda * 2, th);
        for (size_t v = 0; v < variants.size(); ++v) {
          std::sort(tf[v].begin(), tf[v].end());
          std::printf("  %-14s %6.2f (%6.2f)\n", variants[v].name.c_str(), tf[v][tf[v].size() / 2], tf[v].back());
        }
        std::fflush(stdout);
      }
    }
  }
  return 0;
}

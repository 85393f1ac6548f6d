// What this CPU and this OS let us run. Read once, at first use.
#pragma once

namespace kt {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512_bf16 = false;
  bool avx512_vnni = false;
  bool amx_tile = false;
  bool amx_bf16 = false;
  bool amx_int8 = false;
  // The OS saves the YMM / ZMM state (XCR0) and granted the AMX tile state (arch_prctl).
  bool os_avx = false;
  bool os_avx512 = false;
  bool os_amx = false;
};

const CpuFeatures& cpu_features();

}  // namespace kt

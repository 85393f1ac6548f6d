#include "routing.h"

#include <stdexcept>
#include <string>

namespace kt {

Routing route(int T, int K, int E, const int64_t* ids) {
  Routing r;
  r.num_tokens = T;
  r.top_k = K;
  r.offsets.assign(E + 1, 0);
  const int64_t slots = static_cast<int64_t>(T) * K;
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t e = ids[s];
    if (e == -1) continue;
    if (e < 0 || e >= E)
      throw std::invalid_argument("top_k_index[" + std::to_string(s / K) + ", " + std::to_string(s % K) +
                                  "] = " + std::to_string(e) + " is out of range: expected -1 or [0, " +
                                  std::to_string(E) + ")");
    ++r.offsets[e + 1];
  }
  for (int e = 0; e < E; ++e) r.offsets[e + 1] += r.offsets[e];
  const int64_t S = r.offsets[E];
  r.row_token.resize(S);
  r.row_slot.resize(S);
  r.slot_row.assign(slots, -1);
  std::vector<int64_t> fill(r.offsets.begin(), r.offsets.end() - 1);
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t e = ids[s];
    if (e == -1) continue;
    const int64_t row = fill[e]++;
    r.row_token[row] = static_cast<int32_t>(s / K);
    r.row_slot[row] = static_cast<int32_t>(s);
    r.slot_row[s] = row;
  }
  return r;
}

}  // namespace kt

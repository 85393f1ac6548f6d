// Routing of (token, slot) pairs to experts: a stable counting sort, so each expert's rows are
// contiguous and every call with the same ids produces the same order (the backward relies on it).
#pragma once

#include <cstdint>
#include <vector>

namespace kt {

struct Routing {
  int num_tokens = 0;             // T
  int top_k = 0;                  // K
  std::vector<int64_t> offsets;   // [E + 1]: rows of expert e are [offsets[e], offsets[e + 1])
  std::vector<int32_t> row_token; // [S]: token of each sorted row
  std::vector<int32_t> row_slot;  // [S]: t * K + k of each sorted row
  std::vector<int64_t> slot_row;  // [T * K]: sorted row of each slot, -1 for ids of -1

  int64_t num_rows() const { return offsets.back(); }
  int64_t rows(int e) const { return offsets[e + 1] - offsets[e]; }
};

// ids [T, K] in [0, E) or -1 (slot computed elsewhere). Throws std::invalid_argument naming the first
// offending position otherwise.
Routing route(int T, int K, int E, const int64_t* ids);

}  // namespace kt

// Routing of one token row by one warp: float32 softmax over E logits, the top-k in descending order
// of probability (equal probabilities: the lower expert index first), renormalised over the k chosen.
// One device routine for `route` (route.cu) and the decode path of `molora_linear` (molora_decode.cu),
// so both pick the same experts with the same weights.
//
// No per-row scratch is needed: pick i is the largest element, in the strict total order
// (p descending, index ascending), that comes after pick i-1. NaN probabilities order first (as
// torch.sort does), so the k picks are always k distinct valid indices.
#pragma once

#include "common.cuh"

#include <climits>
#include <cmath>

namespace medcare {

struct RowSoftmax {
  float max;
  float inv_sum;
};

template <typename T>
__device__ __forceinline__ RowSoftmax row_softmax(const T* row, int E, int lane) {
  float m = -INFINITY;
  for (int e = lane; e < E; e += 32) m = fmaxf(m, to_float(row[e]));
  m = warp_max(m);
  float s = 0.f;
  for (int e = lane; e < E; e += 32) s += expf(to_float(row[e]) - m);
  s = warp_sum(s);
  return {m, 1.f / s};
}

__device__ __forceinline__ float prob(float logit, const RowSoftmax& sm) { return expf(logit - sm.max) * sm.inv_sum; }

// The sort key of a probability: NaN counts as the largest value.
__device__ __forceinline__ float prob_key(float p) { return isnan(p) ? INFINITY : p; }

// (a_key, a_idx) precedes (b_key, b_idx) in the pick order.
__device__ __forceinline__ bool precedes(float a_key, int a_idx, float b_key, int b_idx) {
  return a_key > b_key || (a_key == b_key && a_idx < b_idx);
}

// Writes weights[0..k) (renormalised, descending) and indices[0..k) for one row; every lane of the
// warp must call it. `weights`/`indices` may point to global or shared memory. Returns nothing; the
// written values are visible to the whole warp on return.
template <typename T, typename IndexT>
__device__ void route_row(const T* row, int E, int k, int lane, float* weights, IndexT* indices) {
  const RowSoftmax sm = row_softmax(row, E, lane);
  float prev_key = INFINITY;
  int prev_idx = -1;
  float chosen_sum = 0.f;
  for (int i = 0; i < k; ++i) {
    float best_key = -1.f;  // probabilities are >= 0, so -1 means "no candidate yet"
    int best_idx = INT_MAX;
    float best_p = 0.f;
    for (int e = lane; e < E; e += 32) {
      const float p = prob(to_float(row[e]), sm);
      const float key = prob_key(p);
      if (precedes(prev_key, prev_idx, key, e) && precedes(key, e, best_key, best_idx)) {
        best_key = key;
        best_idx = e;
        best_p = p;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float k2 = __shfl_xor_sync(kFullMask, best_key, o);
      const int i2 = __shfl_xor_sync(kFullMask, best_idx, o);
      const float p2 = __shfl_xor_sync(kFullMask, best_p, o);
      if (precedes(k2, i2, best_key, best_idx)) {
        best_key = k2;
        best_idx = i2;
        best_p = p2;
      }
    }
    if (lane == 0) {
      weights[i] = best_p;
      indices[i] = static_cast<IndexT>(best_idx);
    }
    chosen_sum += best_p;
    prev_key = best_key;
    prev_idx = best_idx;
  }
  __syncwarp();
  const float inv = 1.f / chosen_sum;
  for (int i = lane; i < k; i += 32) weights[i] = weights[i] * inv;
  __syncwarp();
}

}  // namespace medcare

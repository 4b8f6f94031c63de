// orthogonal_penalty: P = sum_l sum(abs(A_base_l @ A_orth_l.T)) over every layer at once, and its
// gradients dP/dA_base_l = g * sign(M_l) @ A_orth_l, dP/dA_orth_l = g * sign(M_l).T @ A_base_l.
//
// Layers are ragged (r1_l, r2_l, d_l differ), so one device table describes them all (pointers,
// sizes, and each pass's work-item and buffer offsets) and every pass covers all layers in one launch:
//
//   pass 1 (forward and backward): partial M tiles. Work item = (layer, 32x32 tile of M, chunk of
//           kChunk columns of d). Each block writes its partial tile to a workspace; d is split so
//           that a 7B model's long down_proj rows (d = 18944) spread over many blocks.
//   pass 2: per entry of M, the partial tiles summed in chunk order (fixed), then
//           forward: |M| reduced per block by a fixed tree into one float per block;
//           backward: g * sign(M) stored (the scaled sign matrix S).
//   pass 3: forward: one block sums the per-block floats in index order -> P.
//           backward: work item = (layer, base or orth, 32-row x 128-column output tile):
//           d_base = S @ A_orth, d_orth = S.T @ A_base, each element written once in its input dtype.
//
// No floating-point atomics anywhere: every sum has a fixed order, so results are bitwise
// reproducible run to run. Math in float32 for fp16/bf16/fp32 inputs.
#include "common.cuh"

#include <ATen/ops/empty.h>

#include <cstring>
#include <tuple>

namespace medcare {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 32;         // M tile (pass 1) and output-row tile (pass 3)
constexpr int kGradCols = 128;    // output-column tile of pass 3
constexpr int64_t kChunk = 2048;  // columns of d per pass-1 work item

// Per-layer fields of the device table (int64 each).
enum Field : int {
  kBase = 0,     // const T* A_base [r1, d]
  kOrth,         // const T* A_orth [r2, d]
  kR1,
  kR2,
  kD,
  kChunks,       // ceil(d / kChunk)
  kTilesJ,       // ceil(r2 / kTile)
  kItem1,        // first pass-1 work item of the layer (prefix sum)
  kWork,         // offset of the layer's partial tiles in the workspace [chunks, r1, r2]
  kEntry,        // offset of the layer's M entries in the flattened M (prefix of r1 * r2)
  kItem3,        // first pass-3 (gradient) work item of the layer
  kBaseItems3,   // pass-3 items of the layer that compute d_base (the rest compute d_orth)
  kDBase,        // T* d_base [r1, d] (0 when not needed)
  kDOrth,        // T* d_orth [r2, d] (0 when not needed)
  kFields
};

// The largest layer l whose prefix `field` is <= x (layers with no items are skipped over).
__device__ __forceinline__ int find_layer(const int64_t* table, int L, int field, int64_t x) {
  int lo = 0, hi = L - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[mid * kFields + field] <= x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Block-wide sum with a fixed reduction tree (all threads call it; the result is valid in thread 0).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = (threadIdx.x < kThreads / 32) ? scratch[threadIdx.x] : 0.f;
  if (warp == 0) v = warp_sum(v);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) penalty_partial_kernel(const int64_t* __restrict__ table, int L,
                                                                    float* __restrict__ work) {
  __shared__ float As[kTile][kTile + 1];
  __shared__ float Bs[kTile][kTile + 1];
  const int64_t item = blockIdx.x;
  const int l = find_layer(table, L, kItem1, item);
  const int64_t* row = table + l * kFields;
  const T* base = reinterpret_cast<const T*>(row[kBase]);
  const T* orth = reinterpret_cast<const T*>(row[kOrth]);
  const int64_t r1 = row[kR1], r2 = row[kR2], d = row[kD], chunks = row[kChunks];
  const int64_t local = item - row[kItem1];
  const int64_t chunk = local % chunks, tile = local / chunks;
  const int64_t a0 = (tile / row[kTilesJ]) * kTile, b0 = (tile % row[kTilesJ]) * kTile;
  const int64_t k_begin = chunk * kChunk, k_end = min(d, k_begin + kChunk);
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTile) {
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e >> 5, c = e & 31;
      const int64_t k = k0 + c;
      As[r][c] = (a0 + r < r1 && k < k_end) ? to_float(base[(a0 + r) * d + k]) : 0.f;
      Bs[r][c] = (b0 + r < r2 && k < k_end) ? to_float(orth[(b0 + r) * d + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int q = 0; q < kTile; ++q) {
      const float bv = Bs[tx][q];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] = fmaf(As[ty + 8 * i][q], bv, acc[i]);
    }
    __syncthreads();
  }
  float* out = work + row[kWork] + chunk * r1 * r2;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t a = a0 + ty + 8 * i, b = b0 + tx;
    if (a < r1 && b < r2) out[a * r2 + b] = acc[i];
  }
}

// Pass 2. `block_sums` (forward) or `scaled_sign` + `grad` (backward) are given, not both.
__global__ void __launch_bounds__(kThreads) penalty_finish_kernel(const int64_t* __restrict__ table, int L,
                                                                   const float* __restrict__ work, int64_t entries,
                                                                   float* __restrict__ block_sums,
                                                                   const float* __restrict__ grad,
                                                                   float* __restrict__ scaled_sign) {
  __shared__ float scratch[kThreads / 32];
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  float v = 0.f;
  if (e < entries) {
    const int l = find_layer(table, L, kEntry, e);
    const int64_t* row = table + l * kFields;
    const int64_t r1 = row[kR1], r2 = row[kR2], chunks = row[kChunks];
    const int64_t local = e - row[kEntry];
    const float* p = work + row[kWork] + local;
    float m = 0.f;
    for (int64_t c = 0; c < chunks; ++c) m += p[c * r1 * r2];
    if (block_sums != nullptr) {
      v = fabsf(m);
    } else {
      const float s = isnan(m) ? m : static_cast<float>((m > 0.f) - (m < 0.f));
      scaled_sign[e] = s * grad[0];
    }
  }
  if (block_sums != nullptr) {
    v = block_sum(v, scratch);
    if (threadIdx.x == 0) block_sums[blockIdx.x] = v;
  }
}

__global__ void __launch_bounds__(kThreads) penalty_sum_kernel(const float* __restrict__ block_sums, int64_t n,
                                                                float* __restrict__ out) {
  __shared__ float scratch[kThreads / 32];
  float v = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) v += block_sums[i];
  v = block_sum(v, scratch);
  if (threadIdx.x == 0) out[0] = v;
}

// Pass 3 of the backward: out[i, c] = sum_q K(i, q) * V[q, c] with K = S (d_base, V = A_orth) or
// K = S.T (d_orth, V = A_base).
template <typename T>
__global__ void __launch_bounds__(kThreads) penalty_grad_kernel(const int64_t* __restrict__ table, int L,
                                                                 const float* __restrict__ scaled_sign) {
  __shared__ float Ks[kTile][kTile + 1];
  __shared__ float Vs[kTile][kGradCols];
  const int64_t item = blockIdx.x;
  const int l = find_layer(table, L, kItem3, item);
  const int64_t* row = table + l * kFields;
  const int64_t r1 = row[kR1], r2 = row[kR2], d = row[kD];
  const float* S = scaled_sign + row[kEntry];  // [r1, r2]
  int64_t local = item - row[kItem3];
  const bool for_base = local < row[kBaseItems3];
  if (!for_base) local -= row[kBaseItems3];
  const int64_t rows = for_base ? r1 : r2, inner = for_base ? r2 : r1;
  const T* V = reinterpret_cast<const T*>(for_base ? row[kOrth] : row[kBase]);
  T* out = reinterpret_cast<T*>(for_base ? row[kDBase] : row[kDOrth]);
  const int64_t col_tiles = (d + kGradCols - 1) / kGradCols;
  const int64_t i0 = (local / col_tiles) * kTile, c0 = (local % col_tiles) * kGradCols;
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;

  float acc[4][4] = {};
  for (int64_t q0 = 0; q0 < inner; q0 += kTile) {
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e >> 5, q = e & 31;
      const int64_t i = i0 + r, qq = q0 + q;
      float kv = 0.f;
      if (i < rows && qq < inner) kv = for_base ? S[i * r2 + qq] : S[qq * r2 + i];
      Ks[r][q] = kv;
    }
    for (int e = threadIdx.x; e < kTile * kGradCols; e += kThreads) {
      const int q = e / kGradCols, c = e % kGradCols;
      const int64_t qq = q0 + q, cc = c0 + c;
      Vs[q][c] = (qq < inner && cc < d) ? to_float(V[qq * d + cc]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int q = 0; q < kTile; ++q) {
      float kv[4], vv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) kv[i] = Ks[ty + 8 * i][q];
#pragma unroll
      for (int j = 0; j < 4; ++j) vv[j] = Vs[q][tx + 32 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(kv[i], vv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = i0 + ty + 8 * i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx + 32 * j;
      if (c < d) out[r * d + c] = from_float<T>(acc[i][j]);
    }
  }
}

struct Plan {
  std::vector<int64_t> table;  // L * kFields
  int64_t items1 = 0, work = 0, entries = 0, items3 = 0;
};

// Checks the lists and lays out the work. `d_base`/`d_orth` (may be empty) are the gradient outputs.
Plan make_plan(const char* op, const at::TensorList& base_A, const at::TensorList& orth_A,
               const std::vector<at::Tensor>& d_base, const std::vector<at::Tensor>& d_orth) {
  const int64_t L = static_cast<int64_t>(base_A.size());
  Plan plan;
  plan.table.assign(L * kFields, 0);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& b = base_A[l];
    const at::Tensor& o = orth_A[l];
    int64_t* row = plan.table.data() + l * kFields;
    row[kBase] = reinterpret_cast<int64_t>(b.const_data_ptr());
    row[kOrth] = reinterpret_cast<int64_t>(o.const_data_ptr());
    const int64_t r1 = b.size(0), r2 = o.size(0), d = b.size(1);
    row[kR1] = r1;
    row[kR2] = r2;
    row[kD] = d;
    row[kChunks] = ceil_div(d, kChunk);
    row[kTilesJ] = ceil_div(r2, kTile);
    row[kItem1] = plan.items1;
    plan.items1 += ceil_div(r1, kTile) * row[kTilesJ] * row[kChunks];
    row[kWork] = plan.work;
    plan.work += row[kChunks] * r1 * r2;
    row[kEntry] = plan.entries;
    plan.entries += r1 * r2;
    row[kItem3] = plan.items3;
    const int64_t col_tiles = ceil_div(d, kGradCols);
    row[kBaseItems3] = d_base.empty() ? 0 : ceil_div(r1, kTile) * col_tiles;
    plan.items3 += row[kBaseItems3] + (d_orth.empty() ? 0 : ceil_div(r2, kTile) * col_tiles);
    row[kDBase] = d_base.empty() ? 0 : reinterpret_cast<int64_t>(d_base[l].mutable_data_ptr());
    row[kDOrth] = d_orth.empty() ? 0 : reinterpret_cast<int64_t>(d_orth[l].mutable_data_ptr());
  }
  TORCH_CHECK_VALUE(plan.items1 <= INT32_MAX && plan.items3 <= INT32_MAX && ceil_div(plan.entries, kThreads) <= INT32_MAX,
                    op, ": too much work for one launch");
  return plan;
}

void check_lists(const char* op, const at::TensorList& base_A, const at::TensorList& orth_A) {
  TORCH_CHECK_VALUE(base_A.size() == orth_A.size(), op,
                    ": base_A and orth_A must have the same length (one pair per layer), got ", base_A.size(),
                    " and ", orth_A.size());
  TORCH_CHECK_VALUE(!base_A.empty(), op, ": base_A and orth_A must hold at least one pair of tensors");
  TORCH_CHECK_VALUE(base_A.size() <= INT32_MAX, op, ": too many layers");
  const at::Tensor& first = base_A[0];
  for (size_t l = 0; l < base_A.size(); ++l) {
    const std::string bn = "base_A[" + std::to_string(l) + "]", on = "orth_A[" + std::to_string(l) + "]";
    const at::Tensor& b = base_A[l];
    const at::Tensor& o = orth_A[l];
    check_dim(op, bn.c_str(), b, 2, "[r1, d]");
    check_dim(op, on.c_str(), o, 2, "[r2, d]");
    TORCH_CHECK_VALUE(b.size(1) == o.size(1), op, ": ", bn, " [r1, d] and ", on, " [r2, d] must share d, got ",
                      shape_str(b.sizes()), " and ", shape_str(o.sizes()));
    check_float_dtype(op, bn.c_str(), b);
    check_same_dtype(op, bn.c_str(), b, "base_A[0]", first);
    check_same_dtype(op, on.c_str(), o, "base_A[0]", first);
    check_contiguous(op, bn.c_str(), b);
    check_contiguous(op, on.c_str(), o);
  }
  for (size_t l = 0; l < base_A.size(); ++l) {
    check_cuda(op, ("base_A[" + std::to_string(l) + "]").c_str(), base_A[l], first.device());
    check_cuda(op, ("orth_A[" + std::to_string(l) + "]").c_str(), orth_A[l], first.device());
  }
}

// The table, copied to the device through pinned memory (asynchronously, on the current stream).
at::Tensor upload(const std::vector<int64_t>& table, const at::Device& device) {
  const int64_t n = static_cast<int64_t>(table.size());
  auto host = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr<int64_t>(), table.data(), n * sizeof(int64_t));
  auto dev = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
  dev.copy_(host, /*non_blocking=*/true);
  return dev;
}

// Pass 1 over all layers.
void launch_partials(const char* op, at::ScalarType dtype, const Plan& plan, const at::Tensor& table, int L,
                     float* work, cudaStream_t stream) {
  if (plan.items1 == 0) return;
  MEDCARE_DISPATCH_FLOAT(dtype, op, scalar_t, [&] {
    penalty_partial_kernel<scalar_t><<<static_cast<unsigned>(plan.items1), kThreads, 0, stream>>>(
        table.const_data_ptr<int64_t>(), L, work);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor orthogonal_penalty_fwd_cuda(at::TensorList base_A, at::TensorList orth_A) {
  constexpr const char* op = "medcare_kernels::orthogonal_penalty_fwd_cuda";
  check_lists(op, base_A, orth_A);
  const at::Device device = base_A[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Plan plan = make_plan(op, base_A, orth_A, {}, {});
  const int L = static_cast<int>(base_A.size());
  const auto fopts = at::TensorOptions().dtype(at::kFloat).device(device);
  const at::Tensor table = upload(plan.table, device);
  auto work = at::empty({plan.work}, fopts);
  launch_partials(op, base_A[0].scalar_type(), plan, table, L, work.mutable_data_ptr<float>(), stream);
  const int64_t blocks = ceil_div(plan.entries, kThreads);
  auto block_sums = at::empty({blocks}, fopts);
  if (blocks > 0) {
    penalty_finish_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        table.const_data_ptr<int64_t>(), L, work.const_data_ptr<float>(), plan.entries,
        block_sums.mutable_data_ptr<float>(), nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto out = at::empty({}, fopts);
  penalty_sum_kernel<<<1, kThreads, 0, stream>>>(block_sums.const_data_ptr<float>(), blocks,
                                                 out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> orthogonal_penalty_bwd_cuda(
    const at::Tensor& grad, at::TensorList base_A, at::TensorList orth_A, bool need_base, bool need_orth) {
  constexpr const char* op = "medcare_kernels::orthogonal_penalty_bwd_cuda";
  TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad must hold one value (the penalty's gradient), got shape ",
                    shape_str(grad.sizes()));
  check_dtype(op, "grad", grad, at::kFloat);
  check_lists(op, base_A, orth_A);
  const at::Device device = base_A[0].device();
  check_cuda(op, "grad", grad, device);
  const c10::cuda::CUDAGuard guard(device);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> d_base, d_orth;
  for (size_t l = 0; l < base_A.size(); ++l) {
    if (need_base) d_base.push_back(at::empty(base_A[l].sizes(), base_A[l].options()));
    if (need_orth) d_orth.push_back(at::empty(orth_A[l].sizes(), orth_A[l].options()));
  }
  if (!need_base && !need_orth) return {d_base, d_orth};
  const Plan plan = make_plan(op, base_A, orth_A, d_base, d_orth);
  const int L = static_cast<int>(base_A.size());
  const auto fopts = at::TensorOptions().dtype(at::kFloat).device(device);
  const at::Tensor table = upload(plan.table, device);
  auto work = at::empty({plan.work}, fopts);
  launch_partials(op, base_A[0].scalar_type(), plan, table, L, work.mutable_data_ptr<float>(), stream);
  auto scaled_sign = at::empty({plan.entries}, fopts);
  const at::Tensor g = grad.contiguous();
  const int64_t blocks = ceil_div(plan.entries, kThreads);
  if (blocks > 0) {
    penalty_finish_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        table.const_data_ptr<int64_t>(), L, work.const_data_ptr<float>(), plan.entries, nullptr,
        g.const_data_ptr<float>(), scaled_sign.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (plan.items3 > 0) {
    MEDCARE_DISPATCH_FLOAT(base_A[0].scalar_type(), op, scalar_t, [&] {
      penalty_grad_kernel<scalar_t><<<static_cast<unsigned>(plan.items3), kThreads, 0, stream>>>(
          table.const_data_ptr<int64_t>(), L, scaled_sign.const_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {d_base, d_orth};
}

}  // namespace medcare

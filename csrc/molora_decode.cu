// The decode path of molora_linear (few tokens, e.g. T <= 64): BGMV-style kernels that work per
// token on the chosen experts only, so decoding with a stage-1 model pays neither the grouped GEMMs'
// launches and padding nor the dense formulation's E*r-wide expand.
//
//   y      = x @ W.T + b                     the frozen linear: one vendor GEMM (at::linear, cuBLAS)
//   kernel 1 (one warp per dot product): the router logits x @ W_r.T + b_r and the shared shrink
//            lora_x @ A_s.T, for every token (independent of the routing)
//   kernel 2 (block per (token, choice j, group of 8 rank rows)): warp 0 routes the token (softmax,
//            top-k with ties to the lower index, renormalise; the same device code as `route`), then
//            each warp computes one rank row of the chosen expert's shrink lora_x @ A[idx_j].T
//   kernel 3 (block per (token, 256 outputs)): y += s * (sum_j w_j * z_j @ B[idx_j].T + z_s @ B_s.T),
//            accumulated in float32 and written once, in place into the base output
//
// Outputs follow the backend contract: (y [T, d_out] x.dtype, logits [T, E] f32, weights [T, k] f32,
// indices [T, k] i64, z [T, k*r + r_s] f32 with the chosen experts' shrinks in slot order (t, j), then
// the shared shrink). Forward only: the backward of a decode call runs the torch backend's formula
// on these saved tensors.
#include "common.cuh"
#include "routing.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>

#include <optional>
#include <tuple>

namespace medcare {
namespace {

constexpr int kWarps = 8;  // warps per block in kernels 1 and 2
constexpr int kExpandThreads = 256;
constexpr int64_t kMaxSharedBytes = 48 * 1024;  // dynamic shared memory without an opt-in

template <typename TX, typename TP>
__global__ void __launch_bounds__(kWarps * 32) decode_router_shared_kernel(
    const TX* __restrict__ x, const TX* __restrict__ lx, const TP* __restrict__ router_weight,
    const TP* __restrict__ router_bias, const TP* __restrict__ shared_A, int64_t T, int64_t d_in, int E, int r_s,
    int64_t z_cols, int64_t z_shared_col, bool vec, float* __restrict__ logits, float* __restrict__ z) {
  const int lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t per_token = E + r_s;
  if (w >= T * per_token) return;
  const int64_t t = w / per_token;
  const int c = static_cast<int>(w % per_token);
  if (c < E) {
    float v = warp_dot(x + t * d_in, router_weight + c * d_in, d_in, vec, lane);
    if (router_bias != nullptr) v += to_float(router_bias[c]);
    if (lane == 0) logits[t * E + c] = v;
  } else {
    const int q = c - E;
    const float v = warp_dot(lx + t * d_in, shared_A + static_cast<int64_t>(q) * d_in, d_in, vec, lane);
    if (lane == 0) z[t * z_cols + z_shared_col + q] = v;
  }
}

template <typename TX, typename TP>
__global__ void __launch_bounds__(kWarps * 32) decode_route_shrink_kernel(
    const TX* __restrict__ lx, const TP* __restrict__ lora_A, const float* __restrict__ logits, int64_t d_in,
    int E, int r, int k, int64_t z_cols, bool vec, float* __restrict__ weights, int64_t* __restrict__ indices,
    float* __restrict__ z) {
  extern __shared__ float smem[];
  float* w_s = smem;                                 // [k]
  int* idx_s = reinterpret_cast<int*>(smem + k);     // [k]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int groups = r > 0 ? (r + kWarps - 1) / kWarps : 1;  // r == 0: the routing alone
  const int64_t block = blockIdx.x;
  const int g = static_cast<int>(block % groups);
  const int j = static_cast<int>((block / groups) % k);
  const int64_t t = block / (static_cast<int64_t>(groups) * k);
  if (warp == 0) {
    route_row(logits + t * E, E, k, lane, w_s, idx_s);
    if (j == 0 && g == 0) {
      for (int i = lane; i < k; i += 32) {
        weights[t * k + i] = w_s[i];
        indices[t * k + i] = idx_s[i];
      }
    }
  }
  __syncthreads();
  const int q = g * kWarps + warp;
  if (q >= r) return;
  const int64_t e = idx_s[j];
  const float v = warp_dot(lx + t * d_in, lora_A + (e * r + q) * d_in, d_in, vec, lane);
  if (lane == 0) z[t * z_cols + static_cast<int64_t>(j) * r + q] = v;
}

// sum_q z[q] * b[q] over one row of B (n entries; `vec`: n % 8 == 0 and b 16-byte aligned).
template <typename TP>
__device__ __forceinline__ float row_dot(const float* z, const TP* b, int n, bool vec) {
  float acc = 0.f;
  if (vec) {
    for (int q = 0; q < n; q += 8) {
      float v[8];
      load8(b + q, v);
#pragma unroll
      for (int u = 0; u < 8; ++u) acc = fmaf(z[q + u], v[u], acc);
    }
  } else {
    for (int q = 0; q < n; ++q) acc = fmaf(z[q], to_float(b[q]), acc);
  }
  return acc;
}

template <typename TX, typename TP>
__global__ void __launch_bounds__(kExpandThreads) decode_expand_kernel(
    const float* __restrict__ z, const float* __restrict__ weights, const int64_t* __restrict__ indices,
    const TP* __restrict__ lora_B, const TP* __restrict__ shared_B, int64_t d_out, int r, int r_s, int k,
    float scaling, bool vec_b, bool vec_bs, TX* __restrict__ y) {
  extern __shared__ float smem[];
  const int64_t z_cols = static_cast<int64_t>(k) * r + r_s;
  float* z_s = smem;                                       // [k*r + r_s]
  float* gate_s = smem + z_cols;                           // [k]
  int* idx_s = reinterpret_cast<int*>(gate_s + k);         // [k]
  const int64_t tiles = (d_out + kExpandThreads - 1) / kExpandThreads;
  const int64_t t = blockIdx.x / tiles;
  const int64_t o = (blockIdx.x % tiles) * kExpandThreads + threadIdx.x;
  for (int64_t i = threadIdx.x; i < z_cols; i += kExpandThreads) z_s[i] = z[t * z_cols + i];
  for (int i = threadIdx.x; i < k; i += kExpandThreads) {
    gate_s[i] = weights[t * k + i] * scaling;
    idx_s[i] = static_cast<int>(indices[t * k + i]);
  }
  __syncthreads();
  if (o >= d_out) return;
  float acc = 0.f;
  for (int j = 0; j < k; ++j) {
    const TP* b = lora_B + (static_cast<int64_t>(idx_s[j]) * d_out + o) * r;
    acc = fmaf(gate_s[j], row_dot(z_s + static_cast<int64_t>(j) * r, b, r, vec_b), acc);
  }
  if (r_s > 0) acc = fmaf(scaling, row_dot(z_s + static_cast<int64_t>(k) * r, shared_B + o * r_s, r_s, vec_bs), acc);
  TX* out = y + t * d_out + o;
  *out = from_float<TX>(to_float(*out) + acc);
}

template <typename TX, typename TP>
void launch_decode(const at::Tensor& x, const at::Tensor& lx, const at::Tensor& router_weight,
                   const std::optional<at::Tensor>& router_bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                   const std::optional<at::Tensor>& shared_A, const std::optional<at::Tensor>& shared_B, int64_t k,
                   double scaling, at::Tensor& y, at::Tensor& logits, at::Tensor& weights, at::Tensor& indices,
                   at::Tensor& z) {
  const int64_t T = x.size(0), d_in = x.size(1), d_out = y.size(1);
  const int E = static_cast<int>(lora_A.size(0)), r = static_cast<int>(lora_A.size(1));
  const int r_s = shared_A.has_value() ? static_cast<int>(shared_A->size(0)) : 0;
  const int64_t z_cols = k * r + r_s;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const TX* xp = static_cast<const TX*>(x.const_data_ptr());
  const TX* lxp = static_cast<const TX*>(lx.const_data_ptr());
  const TP* wr = static_cast<const TP*>(router_weight.const_data_ptr());
  const TP* br = router_bias.has_value() ? static_cast<const TP*>(router_bias->const_data_ptr()) : nullptr;
  const TP* ap = static_cast<const TP*>(lora_A.const_data_ptr());
  const TP* bp = static_cast<const TP*>(lora_B.const_data_ptr());
  const TP* asp = r_s ? static_cast<const TP*>(shared_A->const_data_ptr()) : nullptr;
  const TP* bsp = r_s ? static_cast<const TP*>(shared_B->const_data_ptr()) : nullptr;
  // 16-byte loads along d_in when every row starts 16-byte aligned.
  const bool vec_in = d_in % 8 == 0 && aligned16(xp) && aligned16(lxp) && aligned16(wr) && aligned16(ap) &&
                      (asp == nullptr || aligned16(asp));
  const bool vec_b = r % 8 == 0 && aligned16(bp);
  const bool vec_bs = r_s % 8 == 0 && (bsp == nullptr || aligned16(bsp));
  float* logits_p = logits.mutable_data_ptr<float>();
  float* z_p = z.mutable_data_ptr<float>();

  const int64_t warps1 = T * (E + r_s);
  TORCH_CHECK_VALUE(ceil_div(warps1, kWarps) <= INT32_MAX && T * k * (r / kWarps + 1) <= INT32_MAX &&
                        T * ceil_div(d_out, kExpandThreads) <= INT32_MAX,
                    "medcare_kernels::molora_decode_cuda: too many tokens for one launch (T = ", T, ")");
  decode_router_shared_kernel<TX, TP><<<static_cast<unsigned>(ceil_div(warps1, kWarps)), kWarps * 32, 0, stream>>>(
      xp, lxp, wr, br, asp, T, d_in, E, r_s, z_cols, k * r, vec_in, logits_p, z_p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t blocks2 = T * k * (r > 0 ? ceil_div(r, kWarps) : 1);
  decode_route_shrink_kernel<TX, TP><<<static_cast<unsigned>(blocks2), kWarps * 32, 2 * k * sizeof(float), stream>>>(
      lxp, ap, logits_p, d_in, E, r, static_cast<int>(k), z_cols, vec_in, weights.mutable_data_ptr<float>(),
      indices.mutable_data_ptr<int64_t>(), z_p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t blocks3 = T * ceil_div(d_out, kExpandThreads);
  const size_t smem3 = (z_cols + 2 * k) * sizeof(float);
  if (blocks3 > 0 && z_cols > 0) {
    decode_expand_kernel<TX, TP><<<static_cast<unsigned>(blocks3), kExpandThreads, smem3, stream>>>(
        z_p, weights.const_data_ptr<float>(), indices.const_data_ptr<int64_t>(), bp, bsp, d_out, r, r_s,
        static_cast<int>(k), static_cast<float>(scaling), vec_b, vec_bs, static_cast<TX*>(y.mutable_data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> molora_decode_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& shared_A, const std::optional<at::Tensor>& shared_B,
    const std::optional<at::Tensor>& lora_x, int64_t top_k, double scaling) {
  constexpr const char* op = "medcare_kernels::molora_decode_cuda";
  // Shapes, dtypes and layouts first (testable without a GPU), devices last.
  check_dim(op, "x", x, 2, "[T, d_in]");
  check_float_dtype(op, "x", x);
  check_contiguous(op, "x", x);
  const int64_t T = x.size(0), d_in = x.size(1);
  check_dim(op, "weight", weight, 2, "[d_out, d_in]");
  const int64_t d_out = weight.size(0);
  check_shape(op, "weight", weight, {d_out, d_in}, "[d_out, d_in]");
  check_same_dtype(op, "weight", weight, "x", x);
  if (bias.has_value()) {
    check_shape(op, "bias", *bias, {d_out}, "[d_out]");
    check_same_dtype(op, "bias", *bias, "x", x);
  }
  check_dim(op, "lora_A", lora_A, 3, "[E, r, d_in]");
  const int64_t E = lora_A.size(0), r = lora_A.size(1);
  TORCH_CHECK_VALUE(E >= 1, op, ": lora_A must hold at least one expert (E >= 1), got shape ",
                    shape_str(lora_A.sizes()));
  check_shape(op, "lora_A", lora_A, {E, r, d_in}, "[E, r, d_in]");
  check_float_dtype(op, "lora_A", lora_A);
  const at::ScalarType pt = lora_A.scalar_type();
  TORCH_CHECK_TYPE(pt == x.scalar_type() || pt == at::kFloat, op,
                   ": lora_A must have the dtype of x (", x.scalar_type(), ") or float32, got ", pt);
  check_contiguous(op, "lora_A", lora_A);
  check_shape(op, "lora_B", lora_B, {E, d_out, r}, "[E, d_out, r]");
  check_same_dtype(op, "lora_B", lora_B, "lora_A", lora_A);
  check_contiguous(op, "lora_B", lora_B);
  check_shape(op, "router_weight", router_weight, {E, d_in}, "[E, d_in]");
  check_same_dtype(op, "router_weight", router_weight, "lora_A", lora_A);
  check_contiguous(op, "router_weight", router_weight);
  if (router_bias.has_value()) {
    check_shape(op, "router_bias", *router_bias, {E}, "[E]");
    check_same_dtype(op, "router_bias", *router_bias, "lora_A", lora_A);
    check_contiguous(op, "router_bias", *router_bias);
  }
  TORCH_CHECK_VALUE(shared_A.has_value() == shared_B.has_value(), op,
                    ": shared_A and shared_B must be given together (or both None)");
  int64_t r_s = 0;
  if (shared_A.has_value()) {
    check_dim(op, "shared_A", *shared_A, 2, "[r_s, d_in]");
    r_s = shared_A->size(0);
    check_shape(op, "shared_A", *shared_A, {r_s, d_in}, "[r_s, d_in]");
    check_shape(op, "shared_B", *shared_B, {d_out, r_s}, "[d_out, r_s]");
    check_same_dtype(op, "shared_A", *shared_A, "lora_A", lora_A);
    check_same_dtype(op, "shared_B", *shared_B, "lora_A", lora_A);
    check_contiguous(op, "shared_A", *shared_A);
    check_contiguous(op, "shared_B", *shared_B);
  }
  if (lora_x.has_value()) {
    check_shape(op, "lora_x", *lora_x, {T, d_in}, "x.shape [T, d_in]");
    check_same_dtype(op, "lora_x", *lora_x, "x", x);
    check_contiguous(op, "lora_x", *lora_x);
  }
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, op, ": top_k must satisfy 1 <= top_k <= E = ", E, ", got ", top_k);
  TORCH_CHECK_VALUE(E <= INT32_MAX && r <= INT32_MAX && r_s <= INT32_MAX, op, ": sizes too large");
  TORCH_CHECK_VALUE((top_k * r + r_s + 2 * top_k) * 4 <= kMaxSharedBytes, op,
                    ": top_k * r + r_s + 2 * top_k = ", top_k * r + r_s + 2 * top_k,
                    " floats per token exceed the decode kernels' shared memory (", kMaxSharedBytes / 4,
                    "); use the torch backend for this shape");
  const at::Device device = x.device();
  check_cuda(op, "x", x, device);
  check_cuda(op, "weight", weight, device);
  if (bias.has_value()) check_cuda(op, "bias", *bias, device);
  check_cuda(op, "router_weight", router_weight, device);
  if (router_bias.has_value()) check_cuda(op, "router_bias", *router_bias, device);
  check_cuda(op, "lora_A", lora_A, device);
  check_cuda(op, "lora_B", lora_B, device);
  if (shared_A.has_value()) {
    check_cuda(op, "shared_A", *shared_A, device);
    check_cuda(op, "shared_B", *shared_B, device);
  }
  if (lora_x.has_value()) check_cuda(op, "lora_x", *lora_x, device);

  const c10::cuda::CUDAGuard guard(device);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::linear(x, weight, bias).contiguous();
  at::Tensor logits = at::empty({T, E}, f32);
  at::Tensor weights = at::empty({T, top_k}, f32);
  at::Tensor indices = at::empty({T, top_k}, x.options().dtype(at::kLong));
  at::Tensor z = at::empty({T, top_k * r + r_s}, f32);
  if (T == 0) return {y, logits, weights, indices, z};
  const at::Tensor& lx = lora_x.has_value() ? *lora_x : x;
  MEDCARE_DISPATCH_FLOAT(x.scalar_type(), op, x_t, [&] {
    if (pt == at::kFloat) {
      launch_decode<x_t, float>(x, lx, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, top_k,
                                scaling, y, logits, weights, indices, z);
    } else {
      launch_decode<x_t, x_t>(x, lx, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, top_k,
                              scaling, y, logits, weights, indices, z);
    }
  });
  return {y, logits, weights, indices, z};
}

}  // namespace medcare

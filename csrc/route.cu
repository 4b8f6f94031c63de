// route: float32 softmax over the experts, top-k (ties to the lower index), renormalised weights;
// and its backward. One warp per token row, four rows per block; float32 math for every input dtype.
#include "common.cuh"
#include "routing.cuh"

#include <ATen/ops/empty.h>

namespace medcare {
namespace {

constexpr int kRowsPerBlock = 4;

template <typename T>
__global__ void route_fwd_kernel(const T* __restrict__ logits, int64_t T_rows, int E, int k,
                                 float* __restrict__ weights, int64_t* __restrict__ indices) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= T_rows) return;  // a whole warp leaves together
  route_row(logits + row * E, E, k, lane, weights + row * k, indices + row * k);
}

// With p = softmax(l), q = p[idx], S = sum(q), w = q / S and g = dL/dw:
//   dq_j = (g_j - sum_i g_i w_i) / S,  dp = scatter(dq),  dl_e = p_e (dp_e - sum_j q_j dq_j).
// Written in two passes over the row: every e gets -p_e * dot, then the chosen ones are overwritten.
template <typename T>
__global__ void route_bwd_kernel(const float* __restrict__ grad_weights, const T* __restrict__ logits,
                                 const float* __restrict__ weights, const int64_t* __restrict__ indices,
                                 int64_t T_rows, int E, int k, float* __restrict__ grad_logits) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= T_rows) return;
  const T* l = logits + row * E;
  const float* g = grad_weights + row * k;
  const float* w = weights + row * k;
  const int64_t* idx = indices + row * k;
  float* out = grad_logits + row * E;

  const RowSoftmax sm = row_softmax(l, E, lane);
  float chosen = 0.f, gw = 0.f;
  for (int j = lane; j < k; j += 32) {
    const int64_t e = idx[j];
    if (e >= 0 && e < E) chosen += prob(to_float(l[e]), sm);
    gw += g[j] * w[j];
  }
  chosen = warp_sum(chosen);
  gw = warp_sum(gw);
  const float inv_chosen = 1.f / chosen;
  float dot = 0.f;
  for (int j = lane; j < k; j += 32) {
    const int64_t e = idx[j];
    if (e >= 0 && e < E) dot += prob(to_float(l[e]), sm) * (g[j] - gw) * inv_chosen;
  }
  dot = warp_sum(dot);
  for (int e = lane; e < E; e += 32) out[e] = -prob(to_float(l[e]), sm) * dot;
  __syncwarp();  // orders the writes above before the overwrites below, across lanes
  for (int j = lane; j < k; j += 32) {
    const int64_t e = idx[j];
    if (e >= 0 && e < E) {
      const float p = prob(to_float(l[e]), sm);
      out[e] = p * ((g[j] - gw) * inv_chosen - dot);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> route_fwd_cuda(const at::Tensor& logits, int64_t top_k) {
  constexpr const char* op = "medcare_kernels::route_fwd_cuda";
  check_dim(op, "logits", logits, 2, "[T, E]");
  check_float_dtype(op, "logits", logits);
  check_contiguous(op, "logits", logits);
  const int64_t T_rows = logits.size(0), E = logits.size(1);
  TORCH_CHECK_VALUE(E >= 1, op, ": logits must have at least one expert (E >= 1), got shape ",
                    shape_str(logits.sizes()));
  TORCH_CHECK_VALUE(E <= INT32_MAX, op, ": logits has too many experts (E = ", E, ")");
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, op, ": top_k must satisfy 1 <= top_k <= E = ", E, ", got ", top_k);
  check_cuda(op, "logits", logits, logits.device());

  const c10::cuda::CUDAGuard guard(logits.device());
  auto weights = at::empty({T_rows, top_k}, logits.options().dtype(at::kFloat));
  auto indices = at::empty({T_rows, top_k}, logits.options().dtype(at::kLong));
  if (T_rows == 0) return {weights, indices};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(ceil_div(T_rows, kRowsPerBlock)));
  MEDCARE_DISPATCH_FLOAT(logits.scalar_type(), op, scalar_t, [&] {
    route_fwd_kernel<scalar_t><<<grid, 32 * kRowsPerBlock, 0, stream>>>(
        static_cast<const scalar_t*>(logits.const_data_ptr()), T_rows, static_cast<int>(E),
        static_cast<int>(top_k), weights.mutable_data_ptr<float>(), indices.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, indices};
}

at::Tensor route_bwd_cuda(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& weights,
                          const at::Tensor& indices) {
  constexpr const char* op = "medcare_kernels::route_bwd_cuda";
  check_dim(op, "logits", logits, 2, "[T, E]");
  check_float_dtype(op, "logits", logits);
  const int64_t T_rows = logits.size(0), E = logits.size(1);
  TORCH_CHECK_VALUE(E >= 1 && E <= INT32_MAX, op, ": logits must have 1 <= E <= 2^31-1 experts, got shape ",
                    shape_str(logits.sizes()));
  check_dim(op, "weights", weights, 2, "[T, k]");
  const int64_t k = weights.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= E, op, ": weights must have 1 <= k <= E = ", E, " columns, got shape ",
                    shape_str(weights.sizes()));
  check_shape(op, "weights", weights, {T_rows, k}, "[T, k]");
  check_shape(op, "grad_weights", grad_weights, {T_rows, k}, "[T, k]");
  check_shape(op, "indices", indices, {T_rows, k}, "[T, k]");
  check_dtype(op, "grad_weights", grad_weights, at::kFloat);
  check_dtype(op, "weights", weights, at::kFloat);
  check_dtype(op, "indices", indices, at::kLong);
  check_contiguous(op, "grad_weights", grad_weights);
  check_contiguous(op, "logits", logits);
  check_contiguous(op, "weights", weights);
  check_contiguous(op, "indices", indices);
  const auto device = grad_weights.device();
  check_cuda(op, "grad_weights", grad_weights, device);
  check_cuda(op, "logits", logits, device);
  check_cuda(op, "weights", weights, device);
  check_cuda(op, "indices", indices, device);

  const c10::cuda::CUDAGuard guard(device);
  auto grad_logits = at::empty({T_rows, E}, logits.options().dtype(at::kFloat));
  if (T_rows == 0) return grad_logits;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(ceil_div(T_rows, kRowsPerBlock)));
  MEDCARE_DISPATCH_FLOAT(logits.scalar_type(), op, scalar_t, [&] {
    route_bwd_kernel<scalar_t><<<grid, 32 * kRowsPerBlock, 0, stream>>>(
        grad_weights.const_data_ptr<float>(), static_cast<const scalar_t*>(logits.const_data_ptr()),
        weights.const_data_ptr<float>(), indices.const_data_ptr<int64_t>(), T_rows, static_cast<int>(E),
        static_cast<int>(k), grad_logits.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logits;
}

}  // namespace medcare

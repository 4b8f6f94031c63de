// Registers the compiled ops as torch.ops.medcare_kernels.* and makes this library importable as the
// Python module medcare_kernels._C (a plain module: the ops go through the dispatcher, so no pybind11
// and only Python's limited API are needed, and one wheel serves every CPython >= 3.10).
//
// The Python custom ops (route, molora_linear, ...) already live in the medcare_kernels namespace,
// so this file adds to it (TORCH_LIBRARY_FRAGMENT) under distinct *_cuda names. The kernels are
// registered for the CUDA dispatch key; the same functions are registered for the CPU key too, where
// their argument checks run and the device check then raises a clear error (instead of the
// dispatcher's "could not run ... with arguments from the CPU backend"). Fake (meta) implementations
// are registered from Python (medcare_kernels/_extension.py).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "build_info.cuh"

#include <optional>
#include <tuple>
#include <vector>

namespace medcare {

std::tuple<at::Tensor, at::Tensor> route_fwd_cuda(const at::Tensor& logits, int64_t top_k);
at::Tensor route_bwd_cuda(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& weights,
                          const at::Tensor& indices);
at::Tensor orthogonal_penalty_fwd_cuda(at::TensorList base_A, at::TensorList orth_A);
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> orthogonal_penalty_bwd_cuda(
    const at::Tensor& grad, at::TensorList base_A, at::TensorList orth_A, bool need_base, bool need_orth);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> molora_decode_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_bias, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& shared_A, const std::optional<at::Tensor>& shared_B,
    const std::optional<at::Tensor>& lora_x, int64_t top_k, double scaling);

}  // namespace medcare

TORCH_LIBRARY_FRAGMENT(medcare_kernels, m) {
  m.def("route_fwd_cuda(Tensor logits, int top_k) -> (Tensor weights, Tensor indices)");
  m.def("route_bwd_cuda(Tensor grad_weights, Tensor logits, Tensor weights, Tensor indices) -> Tensor");
  m.def("orthogonal_penalty_fwd_cuda(Tensor[] base_A, Tensor[] orth_A) -> Tensor");
  m.def(
      "orthogonal_penalty_bwd_cuda(Tensor grad, Tensor[] base_A, Tensor[] orth_A, bool need_base, bool need_orth)"
      " -> (Tensor[] grad_base_A, Tensor[] grad_orth_A)");
  m.def(
      "molora_decode_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor router_weight, Tensor? router_bias, "
      "Tensor lora_A, Tensor lora_B, Tensor? shared_A, Tensor? shared_B, Tensor? lora_x, int top_k, float scaling)"
      " -> (Tensor y, Tensor logits, Tensor weights, Tensor indices, Tensor z)");
}

#define MEDCARE_REGISTER_IMPLS(m)                                               \
  m.impl("route_fwd_cuda", &medcare::route_fwd_cuda);                           \
  m.impl("route_bwd_cuda", &medcare::route_bwd_cuda);                           \
  m.impl("orthogonal_penalty_fwd_cuda", &medcare::orthogonal_penalty_fwd_cuda); \
  m.impl("orthogonal_penalty_bwd_cuda", &medcare::orthogonal_penalty_bwd_cuda); \
  m.impl("molora_decode_cuda", &medcare::molora_decode_cuda)

TORCH_LIBRARY_IMPL(medcare_kernels, CUDA, m) { MEDCARE_REGISTER_IMPLS(m); }

// Argument checks, then "must be a CUDA tensor": never launches anything.
TORCH_LIBRARY_IMPL(medcare_kernels, CPU, m) { MEDCARE_REGISTER_IMPLS(m); }

static PyModuleDef medcare_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "medcare_kernels compiled CUDA ops; importing registers torch.ops.medcare_kernels.*_cuda.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&medcare_module);
  if (mod == nullptr) return nullptr;
  // What this binary was built for: the GPU architectures with machine code (SASS) and with PTX, the
  // virtual architectures nvcc saw, and the torch and CUDA runtime versions it was compiled against.
  if (PyModule_AddStringConstant(mod, "sass_archs", MEDCARE_STR(MEDCARE_SASS_ARCHS)) < 0 ||
      PyModule_AddStringConstant(mod, "ptx_archs", MEDCARE_STR(MEDCARE_PTX_ARCHS)) < 0 ||
      PyModule_AddStringConstant(mod, "device_archs", medcare::device_arch_list()) < 0 ||
      PyModule_AddStringConstant(mod, "torch_version", MEDCARE_STR(MEDCARE_TORCH_VERSION)) < 0 ||
      PyModule_AddIntConstant(mod, "cuda_runtime_version", CUDART_VERSION) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}

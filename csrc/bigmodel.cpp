// Every bigmodel op's schema, in one place. Per-device kernels are registered next to their
// implementations: csrc/cpu/*.cpp for the CPU, bigmodel/ops/*.py for CUDA (the Triton kernels,
// which under the 'cublaslt' backend call the cuBLASLt functions exported below), and autograd
// in csrc/autograd/*.cpp.
//
// Conventions shared by all ops:
//  * linear_relu takes 2-D input (M, K); the Python layer flattens leading dims.
//  * attention takes 4-D (B, H, L, E) tensors with arbitrary strides; the Python layer maps
//    SDPA's (..., L, E) inputs onto that view. It returns the output and the row logsumexp
//    (float32, (B, Hq, L)) that the backward needs.
//  * output_mask says which gradients to compute; the others come back as empty tensors.
#include <torch/library.h>
#include <torch/extension.h>

#include "cpu/linear_act.h"
#include "cpu/linear_narrow.h"
#include "python_call.h"

#if BIGMODEL_WITH_CUDA
#include "cuda/fused_linear_cublaslt.h"
#include "cuda/linear_relu_cublaslt.h"
#endif

TORCH_LIBRARY(bigmodel, m) {
  m.def("linear_relu(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "linear_relu_backward(Tensor grad_output, Tensor output, Tensor input, Tensor weight, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // activation: 'none', 'leaky_relu', 'gelu', 'gelu_tanh', 'silu', 'tanh', 'sigmoid' (ReLU is
  // linear_relu). Returns (out, pre): pre = x W^T + b where the derivative needs it, else empty.
  // keep_pre=False: pre is empty unless autograd records the call (its Autograd kernel then
  // asks for it), so inference writes one output, not two (bigmodel.fused_linear passes it).
  m.def(
      "fused_linear(Tensor input, Tensor weight, Tensor? bias, str activation, float negative_slope, "
      "bool keep_pre=True) -> (Tensor, Tensor)");
  m.def(
      "fused_linear_backward(Tensor grad_output, Tensor output, Tensor pre, Tensor input, Tensor weight, "
      "str activation, float negative_slope, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, "
      "bool is_causal, float scale, Tensor? rng_seed) -> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor? attn_mask, float dropout_p, bool is_causal, float scale, "
      "Tensor? rng_seed) -> (Tensor, Tensor, Tensor)");
}

namespace bigmodel {
bool built_with_cuda() { return BIGMODEL_WITH_CUDA != 0; }
}  // namespace bigmodel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bigmodel C++ engine: op schemas and CPU kernels (registered with torch.library)";
  m.def("built_with_cuda", &bigmodel::built_with_cuda, "Whether the CUDA sources were compiled in");
  // Read once by bigmodel.nn.Linear, so its routing follows the engine's own plan.
  m.def("cpu_narrow_max_out", &bigmodel::linear::narrow_max_n,
        "The most output features the CPU engine's narrow kernels take at this CPU level (0: none)");
  m.def("cpu_narrow_min_in", [] { return bigmodel::linear::kNarrowMinK; },
        "The fewest input features the CPU engine's narrow kernels take");
  m.def("cpu_plain_linear_min_macs", &bigmodel::linear::plain_linear_min_macs,
        "Multiply-adds from which a plain Linear is faster on the CPU engine than F.linear here");
  // bigmodel.linear_relu's and bigmodel.fused_linear's call of their op (csrc/python_call.cpp).
  m.def("linear_call", &bigmodel::linear_call,
        "act(F.linear(input, weight, bias)) through the registered op, or None where the "
        "arguments are not the plain case",
        py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("activation"),
        py::arg("negative_slope"), py::arg("device"));
#if BIGMODEL_WITH_CUDA
  // Not ops: the CUDA kernel of bigmodel::linear_relu calls these under the 'cublaslt' backend.
  m.def("cublaslt_linear_relu", &bigmodel::cublaslt::linear_relu_forward,
        "relu(input @ weight^T + bias) by one cuBLASLt GEMM with a bias+ReLU epilogue");
  m.def("cublaslt_linear_relu_backward", &bigmodel::cublaslt::linear_relu_backward,
        "(dx, dw, db) of linear_relu from the saved output, cuBLASLt GEMMs");
  // And those of bigmodel::fused_linear, for the activations cuBLASLt has an epilogue for.
  m.def("cublaslt_fused_linear_runs", &bigmodel::cublaslt::fused_linear_runs,
        "Whether the cuBLASLt functions take this activation ('none', 'gelu_tanh')");
  m.def("cublaslt_fused_linear", &bigmodel::cublaslt::fused_linear_forward,
        "(out, pre) of fused_linear by one cuBLASLt GEMM with a GELU_AUX_BIAS or BIAS epilogue");
  m.def("cublaslt_fused_linear_backward", &bigmodel::cublaslt::fused_linear_backward,
        "(dx, dw, db) of fused_linear from the saved pre-activation, cuBLASLt GEMMs");
#endif
}

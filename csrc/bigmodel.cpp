// Every bigmodel op's schema, in one place. Per-device kernels are registered next to their
// implementations (csrc/cpu/*.cpp here; CUDA ones from Python via Triton, or csrc/cuda/*.cu).
//
// Conventions shared by all ops:
//  * linear_relu takes 2-D input (M, K); the Python layer flattens leading dims.
//  * attention takes 4-D (B, H, L, E) tensors with arbitrary strides; the Python layer maps
//    SDPA's (..., L, E) inputs onto that view. It returns the output and the row logsumexp
//    (float32, (B, Hq, L)) that the backward needs.
//  * output_mask says which gradients to compute; the others come back as empty tensors.
#include <torch/library.h>
#include <torch/extension.h>

TORCH_LIBRARY(bigmodel, m) {
  m.def("linear_relu(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "linear_relu_backward(Tensor grad_output, Tensor output, Tensor input, Tensor weight, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("linear_relu_cublaslt(Tensor input, Tensor weight, Tensor? bias) -> (Tensor out, Tensor relu_mask)");
  m.def("linear_relu_cublaslt_backward(Tensor grad_output, Tensor relu_mask, Tensor input, Tensor weight, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
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
}

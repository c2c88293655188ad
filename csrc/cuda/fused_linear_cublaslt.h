// The cuBLASLt backend of bigmodel::fused_linear (csrc/cuda/fused_linear_cublaslt.cu) for the
// activations cuBLASLt has an epilogue for: 'gelu_tanh' (GELU_AUX_BIAS) and 'none' (BIAS).
// Exported to Python through bigmodel._C for the op's CUDA kernel to call under 'cublaslt'.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace bigmodel {
namespace cublaslt {

// The activations these functions take (the op's names).
bool fused_linear_runs(const std::string& activation);

// (out, pre) as bigmodel::fused_linear returns them: out = act(input @ weight^T + bias), pre the
// pre-activation for 'gelu_tanh' (its backward reads it), an empty tensor for 'none'.
std::tuple<at::Tensor, at::Tensor> fused_linear_forward(const at::Tensor& input,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::string& activation);

// (dx, dw, db) from grad_output and the saved pre-activation; gradients not in output_mask come
// back empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& pre, const at::Tensor& input,
    const at::Tensor& weight, const std::string& activation, std::array<bool, 3> output_mask);

}  // namespace cublaslt
}  // namespace bigmodel

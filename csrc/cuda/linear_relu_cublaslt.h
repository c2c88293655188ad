// The cuBLASLt backend of bigmodel::linear_relu (csrc/cuda/linear_relu_cublaslt.cu), exported to
// Python through bigmodel._C for the op's CUDA kernel to call under the 'cublaslt' backend.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace bigmodel {
namespace cublaslt {

// relu(input @ weight^T + bias) for 2-D CUDA input, float32/float16/bfloat16; NaN kept.
at::Tensor linear_relu_forward(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias);

// (dx, dw, db) of linear_relu from the saved output; gradients not in output_mask come back empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& input,
    const at::Tensor& weight, std::array<bool, 3> output_mask);

}  // namespace cublaslt
}  // namespace bigmodel

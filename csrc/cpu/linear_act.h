// The CPU engine of the linear + activation ops (bigmodel::linear_relu, bigmodel::fused_linear):
// y = act(x W^T + b) with the activation as an epilogue on the GEMM's cache-resident blocks, and
// its backward with act' fused into the gradient GEMMs' operand. Defined in linear_relu.cpp.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "linear_epilogue.h"

namespace bigmodel {
namespace linear {

// The checks every linear op makes of its 2-D input, weight and bias, in errors naming `op`.
void check_inputs(const char* op, const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias);

// (out, pre): pre is z = x W^T + b, rounded once to the input's dtype, where the backward needs
// it (derivative_reads_pre(act)) and keep_pre is set, else an empty tensor. Without pre the
// epilogue runs in place on the GEMM's output: one output tensor written instead of two.
std::tuple<at::Tensor, at::Tensor> linear_act_forward(const char* op, const Activation& act,
                                                      const at::Tensor& input,
                                                      const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      bool keep_pre = true);

// (dx, dw, db), each empty where output_mask says it is not needed. `saved` is what the
// forward left for act': pre where derivative_reads_pre(act), else out.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(
    const char* op, const Activation& act, const at::Tensor& grad_output, const at::Tensor& saved,
    const at::Tensor& input, const at::Tensor& weight, std::array<bool, 3> output_mask);

// The fewest multiply-adds (M * K * N) from which a plain Linear (no activation) is faster on
// the engine than through F.linear at this CPU and level: bigmodel.nn.Linear's cut-off.
int64_t plain_linear_min_macs();

}  // namespace linear
}  // namespace bigmodel

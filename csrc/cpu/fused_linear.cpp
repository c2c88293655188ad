// CPU kernel of bigmodel::fused_linear: y = act(x W^T + b) for LeakyReLU, GELU (erf or tanh),
// SiLU, Tanh, Sigmoid or none (ReLU is bigmodel::linear_relu). Both run on one engine
// (linear_act.h): the GEMM in cache-sized blocks with the activation as a vectorised epilogue
// on each block while it is in cache (linear_epilogue_kernel.h holds the activations, each with
// torch's NaN and inf semantics), and act' fused into the backward's gradient blocks.
// 16-bit inputs are computed in fp32 and rounded once, unless the CPU has native arithmetic.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>

#include "linear_act.h"

namespace bigmodel {
namespace {

using linear::Activation;

Activation parse(c10::string_view name, double slope) {
  if (name == "none") return {Activation::kNone};
  if (name == "leaky_relu") return {Activation::kLeakyReLU, slope};
  if (name == "gelu") return {Activation::kGelu};
  if (name == "gelu_tanh") return {Activation::kGeluTanh};
  if (name == "silu") return {Activation::kSilu};
  if (name == "tanh") return {Activation::kTanh};
  if (name == "sigmoid") return {Activation::kSigmoid};
  TORCH_CHECK_VALUE(false, "bigmodel::fused_linear: unknown activation '", std::string(name),
                    "'; expected none, leaky_relu, gelu, gelu_tanh, silu, tanh or sigmoid");
}

std::tuple<at::Tensor, at::Tensor> fused_linear_forward(const at::Tensor& input,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        c10::string_view activation, double slope,
                                                        bool keep_pre) {
  const char* op = "bigmodel::fused_linear";
  linear::check_inputs(op, input, weight, bias);
  return linear::linear_act_forward(op, parse(activation, slope), input, weight, bias, keep_pre);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& pre,
    const at::Tensor& input, const at::Tensor& weight, c10::string_view activation, double slope,
    std::array<bool, 3> output_mask) {
  const char* op = "bigmodel::fused_linear_backward";
  linear::check_inputs(op, input, weight, std::nullopt);
  const Activation act = parse(activation, slope);
  const int64_t M = input.size(0), N = weight.size(0);
  TORCH_CHECK(grad_output.sizes() == output.sizes() && output.dim() == 2 && output.size(0) == M &&
                  output.size(1) == N,
              op, ": grad_output ", grad_output.sizes(), " and output ", output.sizes(),
              " must both be (", M, ", ", N, ")");
  const bool reads_pre = linear::derivative_reads_pre(act);
  TORCH_CHECK(!reads_pre || pre.sizes() == output.sizes(), op, ": the ", std::string(activation),
              " backward needs the pre-activation of shape ", output.sizes(), ", got ", pre.sizes());
  return linear::linear_act_backward(op, act, grad_output, reads_pre ? pre : output, input, weight,
                                     output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(bigmodel, CPU, m) {
  m.impl("fused_linear", &fused_linear_forward);
  m.impl("fused_linear_backward", &fused_linear_backward);
}

}  // namespace bigmodel

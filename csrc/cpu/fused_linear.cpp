// CPU kernel of bigmodel::fused_linear: y = act(x W^T + b) for LeakyReLU, GELU (erf or tanh),
// SiLU, Tanh, Sigmoid or none (ReLU is bigmodel::linear_relu, csrc/cpu/linear_relu.cpp).
//
// 16-bit inputs are computed in fp32 blocks and rounded once at the store; the activation and
// its derivative are torch's own ATen kernels on the fp32 values, so every activation keeps
// torch's semantics (NaN, inf, the tanh approximation of GELU) exactly.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <string>
#include <tuple>

namespace bigmodel {
namespace {

enum class Act { kNone, kLeakyRelu, kGelu, kGeluTanh, kSilu, kTanh, kSigmoid };

Act parse(c10::string_view name) {
  if (name == "none") return Act::kNone;
  if (name == "leaky_relu") return Act::kLeakyRelu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "silu") return Act::kSilu;
  if (name == "tanh") return Act::kTanh;
  if (name == "sigmoid") return Act::kSigmoid;
  TORCH_CHECK_VALUE(false, "bigmodel::fused_linear: unknown activation '", std::string(name),
                    "'; expected none, leaky_relu, gelu, gelu_tanh, silu, tanh or sigmoid");
}

// Whether the backward needs the pre-activation z (the derivative is not a function of the output).
bool needs_pre(Act act, double slope) {
  return act == Act::kGelu || act == Act::kGeluTanh || act == Act::kSilu ||
         (act == Act::kLeakyRelu && slope < 0);
}

at::Tensor apply(Act act, const at::Tensor& z, double slope) {
  switch (act) {
    case Act::kNone: return z;
    case Act::kLeakyRelu: return at::leaky_relu(z, slope);
    // GELU(+inf) = +inf, as torch gives it in float64 and fp16 (its fp32/bf16 kernels say NaN).
    case Act::kGelu: return at::where(z == INFINITY, z, at::gelu(z, "none"));
    case Act::kGeluTanh: return at::gelu(z, "tanh");
    case Act::kSilu: return at::silu(z);
    case Act::kTanh: return at::tanh(z);
    case Act::kSigmoid: return at::sigmoid(z);
  }
  return z;
}

// dL/dz from dL/dy and what the forward saved (out, or pre where needs_pre).
at::Tensor derivative(Act act, const at::Tensor& grad, const at::Tensor& out, const at::Tensor& pre,
                      double slope) {
  switch (act) {
    case Act::kNone: return grad;
    case Act::kLeakyRelu:
      // out > 0 exactly where z > 0 for a slope >= 0 (torch's rule: z > 0 ? grad : grad * slope).
      return slope < 0 ? at::leaky_relu_backward(grad, pre, slope, false)
                       : at::where(out > 0, grad, grad * slope);
    case Act::kGelu: return at::gelu_backward(grad, pre, "none");
    case Act::kGeluTanh: return at::gelu_backward(grad, pre, "tanh");
    case Act::kSilu: return at::silu_backward(grad, pre);
    case Act::kTanh: return at::tanh_backward(grad, out);
    case Act::kSigmoid: return at::sigmoid_backward(grad, out);
  }
  return grad;
}

void check_inputs(const char* op, const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-D (M, K), got shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == input.size(1), op,
              ": weight must be (out_features, ", input.size(1), ") for input of shape ", input.sizes(),
              ", got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " does not match input dtype ", input.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be (",
                weight.size(0), ",), got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " does not match input dtype ", input.scalar_type());
  }
}

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}

std::tuple<at::Tensor, at::Tensor> fused_linear_forward(const at::Tensor& input_, const at::Tensor& weight_,
                                                        const std::optional<at::Tensor>& bias_,
                                                        c10::string_view activation, double slope) {
  check_inputs("bigmodel::fused_linear", input_, weight_, bias_);
  const Act act = parse(activation);
  const auto dtype = input_.scalar_type();
  const auto ct = compute_type(dtype);
  // Detached: the kernel runs below autograd and must not record a graph.
  const at::Tensor x = input_.detach().to(ct), w = weight_.detach().to(ct);
  at::Tensor z = bias_.has_value() && bias_->defined() ? at::addmm(bias_->detach().to(ct), x, w.t())
                                                      : at::mm(x, w.t());
  at::Tensor out = apply(act, z, slope).to(dtype);
  at::Tensor pre = needs_pre(act, slope) ? z.to(dtype) : at::empty({0}, input_.options());
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_backward(
    const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& pre, const at::Tensor& input,
    const at::Tensor& weight, c10::string_view activation, double slope, std::array<bool, 3> output_mask) {
  const char* op = "bigmodel::fused_linear_backward";
  check_inputs(op, input, weight, std::nullopt);
  const Act act = parse(activation);
  const int64_t M = input.size(0), N = weight.size(0);
  TORCH_CHECK(grad_output.sizes() == output.sizes() && output.dim() == 2 && output.size(0) == M &&
                  output.size(1) == N,
              op, ": grad_output ", grad_output.sizes(), " and output ", output.sizes(), " must both be (",
              M, ", ", N, ")");
  TORCH_CHECK(!needs_pre(act, slope) || pre.sizes() == output.sizes(), op, ": the ", std::string(activation),
              " backward needs the pre-activation of shape ", output.sizes(), ", got ", pre.sizes());
  const auto dtype = input.scalar_type();
  const auto ct = compute_type(dtype);
  const auto opts = input.options();
  auto f = [&](const at::Tensor& t) { return t.detach().to(ct); };
  const at::Tensor dz = derivative(act, f(grad_output), f(output), needs_pre(act, slope) ? f(pre) : at::Tensor(),
                                   slope);
  at::Tensor dx = output_mask[0] ? at::mm(dz, f(weight)).to(dtype) : at::empty({0}, opts);
  at::Tensor dw = output_mask[1] ? at::mm(dz.t(), f(input)).to(dtype) : at::empty({0}, opts);
  at::Tensor db = output_mask[2] ? dz.sum(0).to(dtype) : at::empty({0}, opts);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigmodel, CPU, m) {
  m.impl("fused_linear", &fused_linear_forward);
  m.impl("fused_linear_backward", &fused_linear_backward);
}

}  // namespace bigmodel

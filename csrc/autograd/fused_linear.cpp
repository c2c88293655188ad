// Autograd for bigmodel::fused_linear, in C++ like every bigmodel op's (see
// csrc/autograd/linear_relu.cpp for why). It saves what the op's backward needs: the input, the
// weight, the output, and the pre-activation the op returns for GELU and SiLU (empty otherwise);
// bigmodel::fused_linear_backward then runs on whichever device the tensors are. A call asked not
// to keep pre (keep_pre=False, as bigmodel.fused_linear asks) gets it all the same where autograd
// records it: grad mode on and an input that requires grad.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../linear_op_handles.h"
#include "records_grad.h"

#include <array>
#include <optional>
#include <tuple>

namespace bigmodel {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    c10::string_view, double, std::array<bool, 3>);

class FusedLinearFunction : public torch::autograd::Function<FusedLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, c10::string_view activation,
                               double negative_slope, bool keep_pre) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, pre] = fused_linear_op().call(input, weight, bias, activation, negative_slope, keep_pre);
    ctx->save_for_backward({input, weight, out, pre});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->mark_non_differentiable({pre});
    // pre has no gradient, and materialised it would be a zero tensor of the output's size per
    // backward (GELU and SiLU return a full pre): 16384x16->1024 GELU spent 13 ms of its 70 ms
    // backward filling 64 MB with zeros (AVX2, 2 cores).
    ctx->set_materialize_grads(false);
    return {out, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("bigmodel::fused_linear_backward", "")
                         .typed<Backward>();
    // Nothing flowed back to the output: no gradient for any input (None), as eager's nodes give.
    if (!grads[0].defined()) return variable_list(6);
    const auto s = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    auto [dx, dw, db] = op.call(grads[0], s[2], s[3], s[0], s[1], activation,
                                ctx->saved_data["negative_slope"].toDouble(), mask);
    return {mask[0] ? dx : at::Tensor(), mask[1] ? dw : at::Tensor(), mask[2] ? db : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> fused_linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         c10::string_view activation, double negative_slope,
                                                         bool keep_pre) {
  // A call autograd does not record goes straight to the kernel (no node, context or saved
  // tensors: csrc/autograd/linear_relu.cpp). Where it records, the backward reads pre, whatever
  // the caller asked.
  if (!records_grad(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return fused_linear_op().call(input, weight, bias, activation, negative_slope, keep_pre);
  }
  auto outs = FusedLinearFunction::apply(input, weight, bias, activation, negative_slope, true);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigmodel, Autograd, m) {
  m.impl("fused_linear", &fused_linear_autograd);
}

}  // namespace bigmodel

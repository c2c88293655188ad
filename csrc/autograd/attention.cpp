// Autograd for bigmodel::attention, in C++ like every bigmodel op's (see
// csrc/autograd/linear_relu.cpp for why). Device-agnostic: the saved tensors go to
// bigmodel::attention_backward, which the dispatcher sends to the C++ engine on CPU and to the
// Triton kernels on CUDA. The mask and the dropout seed get no gradient, as in torch's fused SDPA
// kernels; the logsumexp output is not differentiable.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace bigmodel {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Forward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    double, bool, double, const std::optional<at::Tensor>&);
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const std::optional<at::Tensor>&, double, bool, double,
    const std::optional<at::Tensor>&);

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                               double dropout_p, bool is_causal, double scale,
                               const std::optional<at::Tensor>& rng_seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("bigmodel::attention", "")
                         .typed<Forward>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op.call(query, key, value, attn_mask, dropout_p, is_causal, scale, rng_seed);
    ctx->save_for_backward({query, key, value, out, lse, attn_mask.value_or(at::Tensor()),
                            rng_seed.value_or(at::Tensor())});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // lse has no gradient: no zero tensor for it
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("bigmodel::attention_backward", "")
                         .typed<Backward>();
    if (!grads[0].defined()) return variable_list(8);  // nothing flowed back: no input gradient
    const auto s = ctx->get_saved_variables();
    auto [dq, dk, dv] = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], maybe(s[5]),
                                ctx->saved_data["dropout_p"].toDouble(),
                                ctx->saved_data["is_causal"].toBool(),
                                ctx->saved_data["scale"].toDouble(), maybe(s[6]));
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_autograd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal, double scale,
    const std::optional<at::Tensor>& rng_seed) {
  auto outs = AttentionFunction::apply(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                       rng_seed);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigmodel, Autograd, m) {
  m.impl("attention", &attention_autograd);
}

}  // namespace bigmodel

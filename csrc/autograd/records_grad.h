// Whether autograd records a call of one of the linear ops: grad mode on and an input that
// needs a gradient. Where it does not, the Autograd kernels call the op's kernel directly.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <optional>

namespace bigmodel {

inline bool records_grad(const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  return c10::GradMode::is_enabled() &&
         (input.requires_grad() || weight.requires_grad() ||
          (bias.has_value() && bias->defined() && bias->requires_grad()));
}

}  // namespace bigmodel

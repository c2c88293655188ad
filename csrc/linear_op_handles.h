// Typed dispatcher handles of the linear ops' forwards, each looked up once (an inline function's
// static is one object across translation units). The Autograd kernels call the op below
// autograd through them, and the public functions' plain call (python_call.cpp) from Python.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace bigmodel {

using LinearReLUForward = at::Tensor(const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&);
using FusedLinearForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                              const std::optional<at::Tensor>&,
                                                              c10::string_view, double, bool);

inline const c10::TypedOperatorHandle<LinearReLUForward>& linear_relu_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bigmodel::linear_relu", "")
                             .typed<LinearReLUForward>();
  return op;
}

inline const c10::TypedOperatorHandle<FusedLinearForward>& fused_linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bigmodel::fused_linear", "")
                             .typed<FusedLinearForward>();
  return op;
}

}  // namespace bigmodel

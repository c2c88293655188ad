// linear_call: bigmodel.linear_relu's and bigmodel.fused_linear's plain case in one pybind call
// (csrc/python_call.cpp says why and what "plain" is).
#pragma once

#include <torch/extension.h>

#include <string>

namespace bigmodel {

// act(F.linear(input, weight, bias)) through the registered op, bigmodel::linear_relu for
// activation "relu", else bigmodel::fused_linear with that op activation name; None where the
// arguments are not the plain case (the caller's Python path then takes them). device: "cpu" or
// "cuda" where the backend in force runs only there (None for tensors elsewhere), "" for either.
py::object linear_call(py::handle input, py::handle weight, py::handle bias,
                       const std::string& activation, double negative_slope,
                       const std::string& device);

}  // namespace bigmodel

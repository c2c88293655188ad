// The public linear functions' common call, from Python straight to the registered op.
//
// bigmodel.linear_relu / bigmodel.fused_linear check their arguments, flatten the input to 2-D
// and call torch.ops.bigmodel.<op>.default. On a small layer that path is most of the call:
// Python's checks (~1.3 us), the op's attribute lookup (~0.4 us) and torch.ops' generic
// argument parsing against the schema (~0.8 us more than a typed call), against ~2.6 us for
// the whole of F.linear (8x16->16, Zen 5). Here the same checks and the same op call (through
// the dispatcher, so autograd, autocast, the CPU and CUDA kernels and dispatch modes are all
// the op's own) cost one pybind call: bigmodel.linear_relu at 8x16->16 under no_grad 5.0-5.8 ->
// 3.0 us, against 3.6 us for eager F.relu(F.linear) (Zen 5, AVX512).
//
// It takes only the plain case and answers None for anything else, which the Python function
// then handles as before (and raises its errors for): a tensor subclass or mode with
// __torch_function__, mixed dtypes or devices (autocast's, or errors), a dtype no kernel takes,
// a shape F.linear rejects.
#include "python_call.h"

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

#include "linear_op_handles.h"

namespace bigmodel {
namespace {

// A torch.Tensor or nn.Parameter itself: no subclass, so no __torch_function__ to honour.
bool plain_tensor(PyObject* obj) {
  const auto* type = reinterpret_cast<PyObject*>(Py_TYPE(obj));
  return type == THPVariableClass || type == ParameterClass;
}

// Whether one of the op's kernels takes the dtype on the device (bigmodel/ops/linear_relu.py,
// _RUNS): the CPU engine float, double, half, bfloat16; Triton the same but double.
bool kernel_takes(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  const bool low = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
  if (t.is_cpu()) return low || dtype == at::kDouble;
  return t.is_cuda() && low;
}

}  // namespace

py::object linear_call(py::handle input, py::handle weight, py::handle bias,
                       const std::string& activation, double negative_slope,
                       const std::string& device) {
  const bool has_bias = !bias.is_none();
  if (at::impl::torch_function_mode_enabled() || !plain_tensor(input.ptr()) ||
      !plain_tensor(weight.ptr()) || (has_bias && !plain_tensor(bias.ptr()))) {
    return py::none();
  }
  const at::Tensor& in = THPVariable_Unpack(input.ptr());
  const at::Tensor& w = THPVariable_Unpack(weight.ptr());
  std::optional<at::Tensor> b;
  if (has_bias) b = THPVariable_Unpack(bias.ptr());
  if ((device == "cpu" && !in.is_cpu()) || (device == "cuda" && !in.is_cuda())) return py::none();
  if (in.dim() < 1 || w.dim() != 2 || in.size(-1) != w.size(1) || !kernel_takes(in) ||
      w.scalar_type() != in.scalar_type() || w.device() != in.device()) {
    return py::none();
  }
  if (b.has_value() && (b->dim() != 1 || b->size(0) != w.size(0) ||
                        b->scalar_type() != in.scalar_type() || b->device() != in.device())) {
    return py::none();
  }
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;  // as torch.ops releases it around the op
    const bool flat = in.dim() == 2;
    // (M, K) with M spelled out: reshape(-1, K) is ambiguous for an empty K. 2-D input as it is.
    const at::Tensor x =
        flat ? in
             : in.reshape({c10::multiply_integers(in.sizes().slice(0, in.dim() - 1)), in.size(-1)});
    // keep_pre=false, as bigmodel.fused_linear asks: pre only where autograd records the call.
    out = activation == "relu"
              ? linear_relu_op().call(x, w, b)
              : std::get<0>(fused_linear_op().call(x, w, b, activation, negative_slope, false));
    if (!flat) {
      std::vector<int64_t> shape(in.sizes().begin(), in.sizes().end() - 1);
      shape.push_back(w.size(0));
      out = out.reshape(shape);
    }
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
}

}  // namespace bigmodel

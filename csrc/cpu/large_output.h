// Fresh output tensors of 32 MB and more for the CPU engine (linear_relu.cpp): 2 MB-aligned,
// advised as transparent huge pages, and reused from a small cache of freed blocks.
#pragma once

#include <ATen/ATen.h>

namespace bigmodel {

// Outputs from this size up come from the large-output allocator (below it, torch's).
constexpr int64_t kLargeOutputBytes = int64_t(32) << 20;

// An uninitialised tensor of `sizes` and `opts` (CPU): torch's allocator below
// kLargeOutputBytes, the large-output allocator from there.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts);

}  // namespace bigmodel

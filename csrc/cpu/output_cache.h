// The CPU engine's output tensors (linear_relu.cpp, linear_narrow.h, attention.cpp): from
// kCachedOutputBytes up they come from a cache of freed blocks, as torch's CUDA caching allocator
// serves GPU memory, so a training loop's outputs and gradients are the same blocks step after
// step and never pay the page faults of fresh memory; those of kLargeOutputBytes and more are
// also 2 MB-aligned huge pages. Below, torch's own allocator.
#pragma once

#include <ATen/ATen.h>

namespace bigmodel {

// From this size up, outputs come from the cache.
constexpr int64_t kCachedOutputBytes = int64_t(256) << 10;

// From this size up, a block is advised as huge pages (and the engine's linear ops take their
// large-tensor plans, linear_relu.cpp: oneDNN block by block where onednn_blocks says so).
constexpr int64_t kLargeOutputBytes = int64_t(32) << 20;

// An uninitialised tensor of `sizes` and `opts` (CPU, contiguous).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts);

}  // namespace bigmodel

// Everything attention_kernel.h needs apart from at::vec, included before a capability file
// turns on AVX2/AVX512 code generation (see cpu_vec.h).
#pragma once

#include "cpu_vec.h"
#include "attention_args.h"

#include <atomic>

#include <cstddef>
#include <new>

namespace bigmodel {
namespace attn {

// Scratch blocks start on a cache line. std::vector's 16-byte alignment let a process's
// buffers land 16 or 48 bytes into a line, so that every other vector load of the block
// products split two lines: the forward at (2, 8, 1024, 64) ran 23.0 or 25.1 ms by the process
// (AVX2, the Xeon), torch's SDPA 23.5 in both.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kLine{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kLine)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kLine); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

template <typename T>
using Buffer = std::vector<T, CacheLineAllocator<T>>;

}  // namespace attn
}  // namespace bigmodel

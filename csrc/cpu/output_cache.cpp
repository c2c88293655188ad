// The engine's output allocator (output_cache.h).
//
// Why: glibc hands fresh memory to large requests, and its first touch costs a page fault and
// the kernel's zeroing per 4 KB page.
//  * From 32 MB every block is a new mmap, and its free a munmap: every call pays again. On the
//    AVX-512 Xeon, 2 threads: empty + fill of 64 MB 17 ms, against 53.5 ms for the whole
//    (16384, 256) x (256, 1024) GEMM that writes it. Huge pages cut the faults to one per 2 MB
//    (32 MB: 8 ms -> 1.6 ms).
//  * Below, whether a freed block comes back without faults depends on the heap's history (its
//    top is trimmed back to the system): the same 4096x784->512 F.silu(F.linear) ran at 410, 717
//    or 3966 page faults a call in different processes (11.2, 12.0 and 15.4 ms), and a seed MLP
//    step at 37-2700.
// Reusing a freed block, as torch's CUDA caching allocator does, removes the faults and the
// zeroing altogether, in every process.
//
// The cache holds freed blocks up to kCacheBytes in all and hands one out for a request of its
// exact rounded size (4 KB pages; 2 MB from kLargeOutputBytes): a training loop allocates the
// same shapes step after step. The most recently freed block of a size goes out first (its
// lines may still be in cache); the oldest are freed first once the cap is reached.
// BIGMODEL_CPU_OUTPUT_CACHE=0 turns the cache off (every block is freed as it is released).
#include "output_cache.h"

#include <ATen/EmptyTensor.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <list>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace bigmodel {
namespace {

constexpr size_t kPage = size_t(4) << 10, kHugePage = size_t(2) << 20;
constexpr size_t kCacheBytes = size_t(512) << 20;

struct Block {
  void* data;
  size_t bytes;
  std::list<Block*>::iterator age;  // its place in the release order, while cached
};

class OutputAllocator final : public at::Allocator {
 public:
  at::DataPtr allocate(size_t n) override {
    const bool large = n >= static_cast<size_t>(kLargeOutputBytes);
    const size_t align = large ? kHugePage : kPage;
    const size_t bytes = (std::max<size_t>(n, 1) + align - 1) / align * align;
    Block* block = take(bytes);
    if (block == nullptr) {
      void* p = std::aligned_alloc(align, bytes);
      TORCH_CHECK(p != nullptr, "bigmodel: out of memory allocating ", bytes, " bytes");
#ifdef MADV_HUGEPAGE
      if (large) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: without THP it is simply ignored
#endif
      block = new Block{p, bytes, {}};
    }
    // The context is the block record: the deleter needs the size to cache it.
    return {block->data, block, &release, at::Device(at::kCPU)};
  }

  // No raw deleter: the context (the block record) is not the data pointer.
  at::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  // The cached blocks, by size (most recently freed last) and in release order. Never destroyed:
  // a tensor freed during process exit, after static destructors ran, must still find them.
  struct Cache {
    std::mutex lock;
    std::unordered_map<size_t, std::vector<Block*>> by_size;
    std::list<Block*> by_age;
    size_t bytes = 0;
  };
  static Cache& cache() {
    static auto* c = new Cache;
    return *c;
  }

  static bool caching() {
    static const bool on = [] {
      const char* v = std::getenv("BIGMODEL_CPU_OUTPUT_CACHE");
      return v == nullptr || std::string(v) != "0";
    }();
    return on;
  }

  // A cached block of exactly `bytes`, or nullptr.
  static Block* take(size_t bytes) {
    Cache& c = cache();
    std::lock_guard<std::mutex> guard(c.lock);
    auto it = c.by_size.find(bytes);
    if (it == c.by_size.end()) return nullptr;
    Block* b = it->second.back();
    it->second.pop_back();
    if (it->second.empty()) c.by_size.erase(it);  // no empty entries for sizes seen once
    c.by_age.erase(b->age);
    c.bytes -= bytes;
    return b;
  }

  static void free_block(Block* b) {
    std::free(b->data);
    delete b;
  }

  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    if (!caching() || block->bytes > kCacheBytes) {  // a block above the cap evicts nothing
      free_block(block);
      return;
    }
    Cache& c = cache();
    std::lock_guard<std::mutex> guard(c.lock);
    // Oldest blocks out first until this one fits under the cap.
    while (!c.by_age.empty() && c.bytes + block->bytes > kCacheBytes) {
      Block* old = c.by_age.front();
      c.by_age.pop_front();
      auto same = c.by_size.find(old->bytes);
      same->second.erase(std::find(same->second.begin(), same->second.end(), old));
      if (same->second.empty()) c.by_size.erase(same);
      c.bytes -= old->bytes;
      free_block(old);
    }
    c.by_size[block->bytes].push_back(block);
    block->age = c.by_age.insert(c.by_age.end(), block);
    c.bytes += block->bytes;
  }
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  // Small blocks come back from glibc's bins without faults: torch's allocator.
  if (numel * int64_t(opts.dtype().itemsize()) < kCachedOutputBytes) return at::empty(sizes, opts);
  static OutputAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   opts.dtype().toScalarType(), std::nullopt);
}

}  // namespace bigmodel

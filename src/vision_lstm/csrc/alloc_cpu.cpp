// A caching allocator for PyTorch's CPU tensors: freed blocks of 64 KB to 32 MB are kept and handed out again to
// requests of (about) their size, instead of going back through malloc.
//
// Why: a ViL training step frees and re-allocates thousands of tensors of the same few dozen sizes, step after step.
// glibc's malloc serves each from its general heap: finding a fitting chunk, splitting it, coalescing it again on
// free, all on the main thread while the other core waits; and its heap fragments, so that on a 2-core Xeon with AMX
// (ViL-T, batch 128) the training step's peak RSS was 2.00 GB in bf16 and 3.30 GB in fp32 against 1.59 and 2.51 GB
// with freed blocks reused by size (results/benchmarks/session29-amx-final and session30-amx-final). This is
// what PyTorch's CUDA allocator does on the GPU, in the simplest form that fits a loop of repeating shapes.
//
// Rules:
// - Blocks are sized in whole pages (4 KB); a request takes the smallest cached block that is at least its size and
//   at most 1/8 larger, else a new block from malloc. Smaller requests go to malloc and back directly, and so do
//   blocks above the largest size given at installation (the package passes glibc's mapping threshold, 32 MB:
//   one-off buffers such as a decoded dataset still go back to the OS when freed).
// - The cache never holds more than the peak of the bytes in use in blocks of the sizes it keeps: a freed block
//   that would take it over goes back to malloc. So the process holds at most twice its own peak, and a loop whose
//   shapes change (a smaller last batch, evaluation at another batch size) does not pile up blocks it no longer
//   uses.
//   release_tensor_cache() hands every cached block back to malloc.
// - Thread-safe (one mutex; the intra-op threads of a parallel region allocate too), and safe across fork (a child
//   process, such as a data-loading worker, starts with the lock free).
// - Installed by vision_lstm/fused.py when the kernels load, unless the user opted out of the package's malloc
//   settings (vision_lstm/runtime.py: VIL_MALLOC=default, or glibc's own malloc variables set). Tensors allocated
//   before then keep their own deleters, so switching allocators in a running process is safe.
//
// Compiled with the kernels by vision_lstm/fused.py.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <pthread.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <vector>

namespace {

constexpr size_t kHeader = 64;  // the block's capacity lives before the data, which keeps c10's 64-byte alignment
constexpr size_t kPage = 4096;
constexpr size_t kMinCached = size_t{64} << 10;

struct CacheState {
  std::mutex mutex;
  std::map<size_t, std::vector<void*>> free_blocks;  // capacity -> blocks (their headers)
  size_t max_cached = 0;  // the largest block kept (set once, at installation)
  size_t in_use = 0, peak_in_use = 0, cached = 0;  // bytes of the blocks it keeps (cacheable())
  int64_t hits = 0, misses = 0;
};

// Never destroyed: tensors freed while the interpreter shuts down may outlive static destructors.
CacheState& state() {
  static CacheState* s = new CacheState();
  return *s;
}

void* header_of(void* data) { return static_cast<char*>(data) - kHeader; }

// Blocks of the sizes the cache keeps; all others go to malloc and back directly, uncounted.
bool cacheable(size_t capacity) { return capacity >= kMinCached && capacity <= state().max_cached; }

void* new_block(size_t capacity) {
  void* header = nullptr;
  if (posix_memalign(&header, kHeader, capacity + kHeader) != 0) return nullptr;
  *static_cast<size_t*>(header) = capacity;
  return header;
}

void release_block(void* data) {
  if (data == nullptr) return;
  c10::profiledCPUMemoryReporter().Delete(data);
  void* header = header_of(data);
  const size_t capacity = *static_cast<size_t*>(header);
  if (!cacheable(capacity)) {
    std::free(header);
    return;
  }
  CacheState& s = state();
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    s.in_use -= capacity;
    if (s.cached + capacity <= s.peak_in_use) {
      s.free_blocks[capacity].push_back(header);
      s.cached += capacity;
      return;
    }
  }
  std::free(header);
}

struct CachingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (nbytes == 0) return {nullptr, nullptr, &release_block, cpu};
    // (rounding a size near SIZE_MAX up to whole pages, plus the header, would wrap around to a small block)
    TORCH_CHECK_WITH(OutOfMemoryError, nbytes <= (SIZE_MAX >> 2), "vision_lstm's CPU allocator: cannot allocate ",
                     nbytes, " bytes (out of memory)");
    const size_t capacity = nbytes < kMinCached ? nbytes : (nbytes + kPage - 1) / kPage * kPage;
    void* header = nullptr;
    if (cacheable(capacity)) {
      CacheState& s = state();
      std::lock_guard<std::mutex> lock(s.mutex);
      auto fit = s.free_blocks.lower_bound(capacity);
      if (fit != s.free_blocks.end() && fit->first <= capacity + capacity / 8) {
        header = fit->second.back();
        fit->second.pop_back();
        s.cached -= fit->first;
        s.in_use += fit->first;
        s.peak_in_use = std::max(s.peak_in_use, s.in_use);
        if (fit->second.empty()) s.free_blocks.erase(fit);
        ++s.hits;
      }
    }
    if (header == nullptr) {  // a miss (or a block the cache does not keep): from malloc, outside the lock
      header = new_block(capacity);
      TORCH_CHECK_WITH(OutOfMemoryError, header != nullptr, "vision_lstm's CPU allocator: cannot allocate ", nbytes,
                       " bytes (out of memory)");
      if (cacheable(capacity)) {
        CacheState& s = state();
        std::lock_guard<std::mutex> lock(s.mutex);
        s.in_use += capacity;
        s.peak_in_use = std::max(s.peak_in_use, s.in_use);
        ++s.misses;
      }
    }
    void* data = static_cast<char*>(header) + kHeader;
    c10::profiledCPUMemoryReporter().New(data, nbytes);
    return {data, data, &release_block, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingCPUAllocator* allocator() {
  static CachingCPUAllocator* a = new CachingCPUAllocator();
  return a;
}

// A forked child starts with the lock free, whichever thread held it in the parent.
void lock_for_fork() { state().mutex.lock(); }
void unlock_after_fork() { state().mutex.unlock(); }

// Makes this the CPU allocator, keeping freed blocks of up to max_block_bytes (once; later calls change nothing).
// Returns whether it is PyTorch's CPU allocator now: another library may have set one of a higher priority.
bool install_tensor_cache(int64_t max_block_bytes) {
  TORCH_CHECK(max_block_bytes >= 0, "max_block_bytes must be >= 0, got ", max_block_bytes);
  static const bool once = [max_block_bytes] {
    state().max_cached = static_cast<size_t>(max_block_bytes);
    pthread_atfork(&lock_for_fork, &unlock_after_fork, &unlock_after_fork);
    c10::SetCPUAllocator(allocator(), /*priority=*/1);
    return true;
  }();
  (void)once;
  return c10::GetCPUAllocator() == allocator();
}

// Hands every cached block back to malloc; returns the bytes released.
int64_t release_tensor_cache() {
  std::vector<void*> blocks;
  size_t released = 0;
  {
    CacheState& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    for (auto& [capacity, list] : s.free_blocks) blocks.insert(blocks.end(), list.begin(), list.end());
    s.free_blocks.clear();
    released = s.cached;
    s.cached = 0;
  }
  for (void* header : blocks) std::free(header);
  return static_cast<int64_t>(released);
}

// [installed (0/1), bytes in use, peak bytes in use, bytes cached, hits, misses]; the byte counts are of the blocks
// the cache keeps (64 KB to the size given at installation).
std::vector<int64_t> tensor_cache_stats() {
  CacheState& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  return {c10::GetCPUAllocator() == allocator(), static_cast<int64_t>(s.in_use),
          static_cast<int64_t>(s.peak_in_use), static_cast<int64_t>(s.cached), s.hits, s.misses};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vision_lstm_cpu, m) {
  // no tensor arguments: one kernel for every backend
  m.def("install_tensor_cache(int max_block_bytes) -> bool", &install_tensor_cache);
  m.def("release_tensor_cache() -> int", &release_tensor_cache);
  m.def("tensor_cache_stats() -> int[]", &tensor_cache_stats);
}

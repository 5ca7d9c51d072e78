// Explicit 16-lane float vectors for the CPU kernels (mlstm_cpu.cpp, blockdiag_cpu.cpp): GCC/Clang vector
// extensions, which the compiler splits where the CPU has narrower registers, with loads and stores of float and
// bf16 storage. Internal to the extension (an anonymous namespace in each source that includes it).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace {

// The compiler's own vectoriser left the kernels' loops scalar (measured), hence explicit vectors.
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
typedef uint32_t vuint __attribute__((vector_size(64)));
typedef uint16_t vbf16 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;

inline vfloat splat(float x) { return vfloat{} + x; }

// Loads and stores of `count` <= 16 lanes (the rest of a load is 0), in float or bf16 storage. Whole vectors take
// a fixed-size copy, which compiles to one vector move (a variable size would call memcpy).
template <typename V, typename T>
inline void copy_in(V& v, const T* p, int64_t count) {
  if (count == kLanes) {
    std::memcpy(&v, p, sizeof(V));
  } else {
    std::memcpy(&v, p, count * sizeof(T));
  }
}
template <typename V, typename T>
inline void copy_out(T* p, const V& v, int64_t count) {
  if (count == kLanes) {
    std::memcpy(p, &v, sizeof(V));
  } else {
    std::memcpy(p, &v, count * sizeof(T));
  }
}
inline vfloat load(const float* p, int64_t count) {
  vfloat v{};
  copy_in(v, p, count);
  return v;
}
inline vfloat load(const at::BFloat16* p, int64_t count) {
  vbf16 h{};
  copy_in(h, p, count);
  const vuint bits = __builtin_convertvector(h, vuint) << 16;
  return reinterpret_cast<const vfloat&>(bits);
}
inline void store(float* p, vfloat v, int64_t count) { copy_out(p, v, count); }
// bf16: round to nearest even; NaN stays a (quiet) NaN, as c10::BFloat16 does
inline void store(at::BFloat16* p, vfloat v, int64_t count) {
  const vuint bits = reinterpret_cast<const vuint&>(v);
  const vuint rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vuint kept = v != v ? vuint{} + 0x7FC0u : rounded;
  copy_out(p, __builtin_convertvector(kept, vbf16), count);
}

inline float lane_sum(vfloat v) {
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += v[l];
  return sum;
}

}  // namespace

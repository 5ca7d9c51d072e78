// Explicit float vectors for the CPU kernels (mlstm_cpu.cpp, blockdiag_cpu.cpp, layer_cpu.cpp): GCC/Clang vector
// extensions, with loads and stores of float and bf16 storage. Internal to the extension (an anonymous namespace in
// each source that includes it).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// The compiler's own vectoriser left the kernels' loops scalar (measured), hence explicit vectors.
// One vector is one register: 16 lanes (512 bits) with AVX-512, else 8 (AVX2's 256). 16-lane vectors on AVX2, which
// the compiler splits into two registers each, ran the layer's kernels 2-5x slower: the convolution's 9 weight
// vectors (18 in backward) then take 18 (36) of AVX2's 16 registers and spill (ViL-T's shapes in fp32, 2 cores of an
// AVX2 AMD EPYC, session 34, ad hoc: conv_silu forward 8.98 against 3.70 ms, block_diag_outer 8.6 against 1.6).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float vfloat __attribute__((vector_size(4 * kLanes)));
typedef int32_t vint __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vuint __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vbf16 __attribute__((vector_size(2 * kLanes)));

template <int... L>
constexpr vint lane_index(std::integer_sequence<int, L...>) { return vint{L...}; }
const vint kLaneIndex = lane_index(std::make_integer_sequence<int, kLanes>{});  // {0, 1, ..., kLanes - 1}

// x in every lane. As x - 0 (exact for every x, -0 included), which compiles to one broadcast; 0 + x, which is not
// exact for -0, took an add before it (a quarter slower in a loop of broadcasts and multiply-adds, session 34)
inline vfloat splat(float x) { return x - vfloat{}; }

// Loads and stores of `count` <= kLanes lanes (the rest of a load is 0), in float or bf16 storage. Whole vectors take
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
#if defined(__AVX512F__)
  // Whole vectors: one widening load and a shift (the generic conversion below compiled to four instructions)
  if (count == kLanes) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return static_cast<vfloat>(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
#endif
  vbf16 h{};
  copy_in(h, p, count);
  const vuint bits = __builtin_convertvector(h, vuint) << 16;
  return reinterpret_cast<const vfloat&>(bits);
}
inline void store(float* p, vfloat v, int64_t count) { copy_out(p, v, count); }
// bf16: round to nearest even; NaN stays a (quiet) NaN, as c10::BFloat16 does
inline void store(at::BFloat16* p, vfloat v, int64_t count) {
#if defined(__AVX512BF16__)
  // Whole vectors in one instruction (AVX512-BF16): the same round-to-nearest-even and quiet NaNs, except that it
  // flushes subnormal inputs (below 1.2e-38) to zero
  if (count == kLanes) {
    const __m256bh packed = _mm512_cvtneps_pbh(static_cast<__m512>(v));
    std::memcpy(p, &packed, sizeof(packed));
    return;
  }
#endif
  const vuint bits = reinterpret_cast<const vuint&>(v);
  const vuint rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vuint kept = v != v ? vuint{} + 0x7FC0u : rounded;
  copy_out(p, __builtin_convertvector(kept, vbf16), count);
}

// exp(x) for x in [-87, 88] (a normal float result): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a
// degree-6 Taylor polynomial for exp(r) (error below 2e-7 relative), and 2^n from the exponent bits. n is rounded
// by adding and subtracting 1.5 * 2^23. NaN stays NaN. With AVX-512, 2^n is applied by one vscalefps where the
// exponent bits take a conversion, an add, a shift and a multiply (the same result for such x: the kernels around
// a SiLU are bound by their vector instructions rather than by memory).
inline vfloat exp_core(vfloat x) {
  const vfloat round = splat(12582912.0f);
  const vfloat n = (x * 1.44269504088896341f + round) - round;
  const vfloat r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vfloat p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
#if defined(__AVX512F__)
  return static_cast<vfloat>(_mm512_scalef_ps(static_cast<__m512>(p), static_cast<__m512>(n)));
#else
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  return p * reinterpret_cast<const vfloat&>(bits);
#endif
}

// 1 / d to within about an ulp: with AVX-512, the 14-bit estimate and one Newton step (with a division, the output
// path's kernel ran about 1.4x slower; ad hoc, session 25); elsewhere the division.
inline vfloat reciprocal(vfloat d) {
#if defined(__AVX512F__)
  const vfloat r = static_cast<vfloat>(_mm512_rcp14_ps(static_cast<__m512>(d)));
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

// 1 / (1 + exp(-x)) for any x: exp's argument clamped to [-87, 88] (the result is then exact to rounding: 1 above,
// below 1e-38 beneath); NaN stays NaN (the comparisons are false for it).
inline vfloat sigmoid(vfloat x) {
#if defined(__AVX512F__)
  // one vmaxps and one vminps where the comparisons take a compare and a blend each; NaN in the second operand is
  // what they return, so it stays NaN
  const __m512 e = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), static_cast<__m512>(-x)));
  return reciprocal(1.0f + exp_core(static_cast<vfloat>(e)));
#else
  vfloat e = -x;
  e = e < -87.0f ? splat(-87.0f) : e;
  e = e > 88.0f ? splat(88.0f) : e;
  return reciprocal(1.0f + exp_core(e));
#endif
}

// Calls fn(i, count) for the vectors of [0, n): whole vectors with the constant count kLanes, then the shorter tail.
// Once fn is inlined, the loads and stores of whole vectors compile to plain vector moves; with a count the compiler
// cannot see, each bf16 load went through the stack (ad hoc, session 25: a bf16 kernel ~1.5x slower than in fp32).
// Whole vectors' count comes as std::integral_constant: a lambda that takes it as `auto count` is compiled for the
// constant count even where the compiler does not inline it (a large loop body: session 45's profile found
// source_grads_slice's loads going through memcpy and the stack, its sums in memory).
template <typename Fn>
__attribute__((always_inline)) inline void for_vectors(int64_t n, Fn&& fn) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) fn(i, std::integral_constant<int64_t, kLanes>{});
  if (i < n) fn(i, n - i);
}

// Calls fn(count) for a vector of count <= kLanes lanes, a whole one as std::integral_constant (as for_vectors does):
// for a kernel whose task is one vector of channels, fn compiled for whole vectors and for the last, shorter one
template <typename Fn>
__attribute__((always_inline)) inline void with_count(int64_t count, Fn&& fn) {
  if (count == kLanes) {
    fn(std::integral_constant<int64_t, kLanes>{});
  } else {
    fn(count);
  }
}

// out[e] = sum over the threads' partial rows partial[i * n + e] (i < threads), in thread order: the reduction after
// a kernel in which each thread summed its own range of rows into its own partial row (parameter gradients)
inline void sum_partials(const std::vector<float>& partial, int64_t threads, int64_t n, float* out) {
  std::fill(out, out + n, 0.0f);
  for (int64_t i = 0; i < threads; ++i)
    for (int64_t e = 0; e < n; ++e) out[e] += partial[i * n + e];
}

// The sum of the lanes, pairwise (4 dependent vector adds rather than 16 scalar ones; 3 for 8 lanes)
inline float lane_sum(vfloat v) {
#if defined(__AVX512F__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12))
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
#elif defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)  // 8 lanes
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
#else
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += v[l];
  return sum;
#endif
}

}  // namespace

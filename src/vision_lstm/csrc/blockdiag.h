// The block-diagonal product's vector arithmetic (see blockdiag_cpu.cpp's header comment), shared by the
// projections' own kernels (blockdiag_cpu.cpp) and the cell's forward that computes q, k and v from the tokens per
// slice (mlstm_cpu.cpp): both round the same sums, so their q, k and v are the same bit for bit. Internal to the
// extension (an anonymous namespace in each source that includes it; include vec.h first).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// lane l <- lane (l & ~(BS - 1)) | ((l + S) & (BS - 1)): a rotation by S inside each group of BS lanes
template <int BS, int S, int... L>
inline vfloat rotate_lanes(vfloat v, std::integer_sequence<int, L...>) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  return __builtin_shufflevector(v, v, ((L & ~(BS - 1)) | ((L + S) & (BS - 1)))...);
#else
  return __builtin_shuffle(v, vint{((L & ~(BS - 1)) | ((L + S) & (BS - 1)))...});
#endif
}
template <int BS, int S>
inline vfloat rotate(vfloat v) {
  return S == 0 ? v : rotate_lanes<BS, S>(v, std::make_integer_sequence<int, kLanes>{});
}

template <int BS>
using Shifts = std::make_integer_sequence<int, BS>;

// W (nb, bs, bs) -> the fp32 table W_s[c] (bs rows of C = nb * bs), as blockdiag_cpu.cpp's header comment defines it
std::vector<float> weight_table(const at::Tensor& weight) {
  const auto w = weight.to(at::kFloat).contiguous();
  const int64_t nb = w.size(0), bs = w.size(1), C = nb * bs;
  const float* p = w.data_ptr<float>();
  std::vector<float> table(bs * C);
  for (int64_t s = 0; s < bs; ++s)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = c % bs;
      table[s * C + c] = p[(c / bs) * bs * bs + o * bs + (o + s) % bs];
    }
  return table;
}

// The table form (bs rows of C, as weight_table writes it) back as the weight (C / bs, bs, bs), fp32: a weight
// gradient summed in that form (block_diag_outer, the cell's backward_fp32_projected_sources)
at::Tensor weight_from_table(const float* table, int64_t C, int64_t bs, const at::TensorOptions& options) {
  auto weight = at::empty({C / bs, bs, bs}, options.dtype(at::kFloat));
  float* w = weight.data_ptr<float>();
  for (int64_t s = 0; s < bs; ++s)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = c % bs;
      w[(c / bs) * bs * bs + o * bs + (o + s) % bs] = table[s * C + c];
    }
  return weight;
}

// sum_s W_s * rotate_s(x) for one vector of count channels: x and w (the table's rows, C apart) at its first channel
template <typename T, int BS, int... S>
__attribute__((always_inline)) inline vfloat mm_vector(const T* x, const float* w, int64_t C, int64_t count,
                                                       std::integer_sequence<int, S...>) {
  const vfloat xv = load(x, count);
  vfloat sum{};
  ((sum += load(w + S * C, count) * rotate<BS, S>(xv)), ...);
  return sum;
}

// mm_vector with the table's BS vectors for these channels already loaded (w[s]): the same sum
template <int BS, int... S>
__attribute__((always_inline)) inline vfloat mm_loaded(vfloat x, const vfloat* w, std::integer_sequence<int, S...>) {
  vfloat sum{};
  ((sum += w[S] * rotate<BS, S>(x)), ...);
  return sum;
}

// Whole blocks per vector: up to kLanes channels (16 with AVX-512, 8 on AVX2: ops' vector_lanes() tells callers)
void check_block_size(int64_t bs, int64_t DH) {
  TORCH_CHECK(bs == 1 || bs == 2 || bs == 4 || bs == 8 || bs == 16, "block size must be 1, 2, 4, 8 or 16, got ", bs);
  TORCH_CHECK(bs <= kLanes, "block size ", bs, " is wider than this build's vectors (", kLanes, " lanes: a CPU ",
              "without AVX-512); the layer takes PyTorch's route for it");
  TORCH_CHECK(DH % bs == 0, "the head dimension ", DH, " must be a multiple of the block size ", bs);
}

int64_t check_blocks(const at::Tensor& weight, int64_t C, int64_t DH) {
  TORCH_CHECK(weight.dim() == 3 && weight.size(1) == weight.size(2) && weight.size(0) * weight.size(1) == C,
              "weight must have shape (C / bs, bs, bs) with C = ", C, " channels, got ", weight.sizes());
  check_block_size(weight.size(1), DH);
  return weight.size(1);
}

// Calls fn(std::integral_constant<int, BS>) for the runtime block size bs (checked by check_block_size).
template <typename Fn>
void with_block_size(int64_t bs, Fn&& fn) {
  switch (bs) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    default: fn(std::integral_constant<int, kLanes>{}); break;  // 16 (with 16 lanes)
  }
}

}  // namespace

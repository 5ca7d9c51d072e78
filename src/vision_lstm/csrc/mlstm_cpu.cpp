// Fused elementwise passes of the parallel mLSTM cell on the CPU (xLSTM paper, Beck et al. 2024, eqs. 59-64).
//
// The cell's matrix products stay in PyTorch (batched GEMMs), except in bf16 on CPUs with AVX512-BF16: there
// forward_bf16 computes the whole forward (S = q k^T, C, the normaliser, C v and h; AMX tiles through ATen's brgemm,
// or AVX512-BF16 dot products), weights_forward_qk the scores part of it, and backward_bf16 the whole backward (its
// four products and the passes between them). Between them, the PyTorch form makes
// about ten
// passes over (B, H, T, T) memory forward and six backward (build the decay matrix, clamp, exp, mask, scale,
// multiply, sum, cast, ...). Each function here does one pass instead, recomputing the decay matrix
//   D'[t, s] = exp(max(a_s - cummax(a)_t, -60)) / sqrt(DH)   for s <= t, 0 above the diagonal
// from the O(T) vectors a = i~ - F and cummax(a) rather than reading a stored T x T copy
// (log D[t, s] - m_t = a_s - cummax(a)_t; see cell._decay_matrix). The row divisions h = (C v) / n forward and
// dN = dh / n backward (bf16 rows, fp32 normalisers) are one pass each too.
//
// Shapes: N = B * H independent slices, T tokens, DH head dim. Every (N, T, T) and (N, T) tensor is contiguous;
// the rows of the divisions may have any strides but a unit last one (head views of token-major memory).
// Compiled at first use by vision_lstm/fused.py; the cell falls back to its PyTorch form without it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include <cmath>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"
#include "blockdiag.h"
#include "headnorm.h"

namespace {

constexpr float kLogDecayFloor = -60.0f;  // as cell._LOG_DECAY_FLOOR: exp() of less is below rounding, and slow

// D'[t, s] for the lanes s0 .. s0 + kLanes - 1 of row t (0 above the diagonal)
inline vfloat decay_lanes(vfloat a, float row_max, float scale, int64_t s0, int64_t t) {
  const vint lane = kLaneIndex + static_cast<int32_t>(s0);
  vfloat x = a - row_max;
  x = x < kLogDecayFloor ? splat(kLogDecayFloor) : x;
  const vfloat d = exp_core(x) * scale;  // x in [-60, 0]
  return lane <= static_cast<int32_t>(t) ? d : vfloat{};
}

// A (B, H, T, DH) tensor's base pointer and strides, read once (Tensor::stride() in the kernels' loops was a
// measurable share of their time): the whole kernels' view of q, k, v, h and the gradients
template <typename E>
struct SliceRows {
  E* p;
  int64_t s0, s1, s2;
  E* slice(int64_t b, int64_t hh) const { return p + b * s0 + hh * s1; }
};
template <typename E>
SliceRows<E> slice_rows(const at::Tensor& x) {
  return {static_cast<E*>(x.data_ptr()), x.stride(0), x.stride(1), x.stride(2)};
}

// Asks the cache for T rows of DH elements (bf16 or fp32), `stride` elements apart (one request per 64-byte line).
template <typename T_>
inline void prefetch_rows(const T_* p, int64_t stride, int64_t T, int64_t DH) {
  for (int64_t t = 0; t < T; ++t) {
    const char* row = reinterpret_cast<const char*>(p + t * stride);
    for (int64_t byte = 0; byte < DH * int64_t(sizeof(T_)); byte += 64) __builtin_prefetch(row + byte);
  }
}

// One row t of C = S * D' from its fp32 scores s_row, written to c_row in C's dtype; returns the row's sum.
// Blocks of lanes wholly above the diagonal are only zeroed.
template <typename out_t>
inline float forward_row(const float* s_row, const float* a_i, float row_max, float scale, out_t* c_row, int64_t t,
                         int64_t T) {
  vfloat sum{};
  for_vectors(T, [&](int64_t s0, auto count) {
    vfloat c{};
    if (s0 <= t) {
      c = load(s_row + s0, count) * decay_lanes(load(a_i + s0, count), row_max, scale, s0, t);
      sum += c;
    }
    store(c_row + s0, c, count);
  });
  return lane_sum(sum);
}

// Forward: C = S * D' (the weights of eq. 62), written in C's dtype (fp32, possibly in place of S, or bf16), and
// row_sum = sum_s C[t, s] in fp32, from the fp32 scores S = q k^T.
template <typename out_t>
void forward_f32(const float* scores, const float* a, const float* row_max, float scale, out_t* weights,
                 float* row_sum, int64_t n, int64_t T) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t t = 0; t < T; ++t) {
        row_sum[i * T + t] = forward_row(scores + (i * T + t) * T, a + i * T, row_max[i * T + t], scale,
                                         weights + (i * T + t) * T, t, T);
      }
    }
  });
}

// One row t of the backward's elementwise pass, from G's row (g_row) and the normaliser's share grs of it:
// dC = G + grs; dS = dC * D' written to ds_row (in its dtype); d log D = dC * C added to the column sums `cols` (one
// vector per 16 columns) and returned as the row's sum. Blocks of lanes wholly above the diagonal are only zeroed.
template <typename g_t, typename c_t, typename ds_t>
inline float backward_row(const g_t* g_row, float grs, const c_t* c_row, const float* a_i, float row_max, float scale,
                          ds_t* ds_row, vfloat* cols, int64_t t, int64_t T) {
  vfloat sum{};
  for_vectors(T, [&](int64_t s0, auto count) {
    vfloat ds{};
    if (s0 <= t) {
      const vfloat dc = load(g_row + s0, count) + grs;
      ds = dc * decay_lanes(load(a_i + s0, count), row_max, scale, s0, t);
      const vfloat dlog = dc * load(c_row + s0, count);  // C is 0 above the diagonal
      sum += dlog;
      cols[s0 / kLanes] += dlog;
    }
    store(ds_row + s0, ds, count);
  });
  return lane_sum(sum);
}

// The gradient grad_norm of the normaliser n = max(|row sum|, exp(-m)) routed to the side that is active: to the
// row sum (times its sign), or to the stabiliser m through exp(-m)
inline void normaliser_grads(float grad_norm, float row_sum, float m, float& grad_row_sum, float& grad_m) {
  const float floor = std::exp(-m);
  const bool use_sum = std::abs(row_sum) >= floor;
  const float sign = row_sum > 0.0f ? 1.0f : (row_sum < 0.0f ? -1.0f : 0.0f);
  grad_row_sum = use_sum ? grad_norm * sign : 0.0f;
  grad_m = use_sum ? 0.0f : -grad_norm * floor;
}

// Backward, from G = dN v^T (the gradient of C through h, in the products' dtype) and the normaliser's share
// grad_row_sum (per row): dC = G + grad_row_sum; dS = dC * D' (the scores' gradient, in the products' dtype);
// dlogD = dC * C, returned as its row sums and column sums (what the stabiliser and gate gradients need).
template <typename mm_t>
void backward_f32(const mm_t* grad_c, const float* grad_row_sum, const mm_t* weights, const float* a,
                  const float* row_max, float scale, mm_t* grad_scores, float* row_sums, float* col_sums,
                  int64_t n, int64_t T) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const int64_t blocks = (T + kLanes - 1) / kLanes;
    std::vector<vfloat> cols(blocks);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(cols.begin(), cols.end(), vfloat{});
      const float* a_i = a + i * T;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = (i * T + t) * T;
        row_sums[i * T + t] = backward_row(grad_c + row, grad_row_sum[i * T + t], weights + row, a_i,
                                           row_max[i * T + t], scale, grad_scores + row, cols.data(), t, T);
      }
      for (int64_t b = 0; b < blocks; ++b)
        store(col_sums + i * T + b * kLanes, cols[b], std::min(kLanes, T - b * kLanes));
    }
  });
}

// Rows of a (B, H, T, DH) bf16 tensor divided by a per-row fp32 denominator (B, H, T): the fp32 quotient rounded
// once to bf16, as PyTorch's mixed-dtype division gives it, in one vectorised pass (PyTorch's own is not
// vectorised on the CPU). With `h`, also the fp32 row dot product of the rounded quotient with h (the
// normaliser's gradient needs sum_d (dh / denom) h). num, out and h may have any strides but a unit last one.
void divide_rows_bf16(const at::Tensor& num, const at::Tensor& denom, const at::Tensor& out, const at::Tensor* h,
                      float* dot) {
  const int64_t H = num.size(1), T = num.size(2), DH = num.size(3);
  const auto* pn = num.data_ptr<at::BFloat16>();
  auto* po = out.data_ptr<at::BFloat16>();
  const auto* ph = h ? h->data_ptr<at::BFloat16>() : nullptr;
  const float* pd = denom.data_ptr<float>();
  // strides read once; the rows go slice by slice (b, head), each slice's T rows in a plain loop
  const int64_t n0 = num.stride(0), n1 = num.stride(1), n2 = num.stride(2), o0 = out.stride(0), o1 = out.stride(1),
                o2 = out.stride(2), h0 = h ? h->stride(0) : 0, h1 = h ? h->stride(1) : 0, h2 = h ? h->stride(2) : 0;
  at::parallel_for(0, num.size(0) * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, hh = i % H;
      const at::BFloat16* n_i = pn + b * n0 + hh * n1;
      at::BFloat16* o_i = po + b * o0 + hh * o1;
      const at::BFloat16* h_i = ph ? ph + b * h0 + hh * h1 : nullptr;
      if (i + 1 < end) {  // the next slice's rows: strided head views miss the prefetchers (forward_whole_bf16)
        const int64_t nb = (i + 1) / H, nh = (i + 1) % H;
        prefetch_rows(pn + nb * n0 + nh * n1, n2, T, DH);
        if (ph) prefetch_rows(ph + nb * h0 + nh * h1, h2, T, DH);
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = i * T + t;
        const at::BFloat16* n_row = n_i + t * n2;
        at::BFloat16* o_row = o_i + t * o2;
        const vfloat d = splat(pd[r]);
        vfloat sum{};
        for_vectors(DH, [&](int64_t s0, auto count) {
          const vfloat q = load(n_row + s0, count) / d;
          store(o_row + s0, q, count);
          if (h_i) sum += load(o_row + s0, count) * load(h_i + t * h2 + s0, count);
        });
        if (dot) dot[r] = lane_sum(sum);
      }
    }
  });
}

// x: a CPU tensor of like's (B, H, T, DH) shape in dtype (bf16; fp32 for the fp32 whole kernels), unit last stride
void check_rows(const at::Tensor& x, const at::Tensor& like, const char* what,
                at::ScalarType dtype = at::kBFloat16) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == dtype, what, " must be a ",
              dtype == at::kFloat ? "float32" : "bfloat16", " CPU tensor");
  TORCH_CHECK(x.dim() == 4 && x.sizes() == like.sizes(), what, " must have shape ", like.sizes());
  TORCH_CHECK(x.stride(3) == 1, what, " must have a unit last stride");
}

// out = num / denom; num, out (B, H, T, DH) bf16, denom (B, H, T) fp32 contiguous
void divide_rows(const at::Tensor& num, const at::Tensor& denom, at::Tensor out) {
  check_rows(num, num, "num");
  check_rows(out, num, "out");
  TORCH_CHECK(denom.scalar_type() == at::kFloat && denom.is_contiguous() && denom.numel() * num.size(3) == num.numel(),
              "denom must be a contiguous float32 (B, H, T) tensor");
  divide_rows_bf16(num, denom, out, nullptr, nullptr);
}

// As divide_rows, also returning sum_d out[..., d] * h[..., d] (B, H, T) in fp32
at::Tensor divide_rows_dot(const at::Tensor& num, const at::Tensor& denom, at::Tensor out, const at::Tensor& h) {
  check_rows(num, num, "num");
  check_rows(out, num, "out");
  check_rows(h, num, "h");
  TORCH_CHECK(denom.scalar_type() == at::kFloat && denom.is_contiguous() && denom.numel() * num.size(3) == num.numel(),
              "denom must be a contiguous float32 (B, H, T) tensor");
  auto dot = at::empty({num.size(0), num.size(1), num.size(2)}, denom.options());
  divide_rows_bf16(num, denom, out, &h, dot.data_ptr<float>());
  return dot;
}

// ---- float64: plain loops, for the tests' reference precision ----
void forward_f64(const double* scores, const double* a, const double* row_max, double scale, double* weights,
                 double* row_sum, int64_t n, int64_t T) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = (i * T + t) * T;
        double sum = 0;
        for (int64_t s = 0; s < T; ++s) {
          const double x = std::max(a[i * T + s] - row_max[i * T + t], static_cast<double>(kLogDecayFloor));
          const double c = s <= t ? scores[row + s] * std::exp(x) * scale : 0.0;
          sum += c;
          weights[row + s] = c;
        }
        row_sum[i * T + t] = sum;
      }
    }
  });
}

void backward_f64(const double* grad_c, const double* grad_row_sum, const double* weights, const double* a,
                  const double* row_max, double scale, double* grad_scores, double* row_sums, double* col_sums,
                  int64_t n, int64_t T) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double* col = col_sums + i * T;
      std::fill(col, col + T, 0.0);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = (i * T + t) * T;
        double sum = 0;
        for (int64_t s = 0; s < T; ++s) {
          const double x = std::max(a[i * T + s] - row_max[i * T + t], static_cast<double>(kLogDecayFloor));
          const double dc = grad_c[row + s] + grad_row_sum[i * T + t];
          grad_scores[row + s] = s <= t ? dc * std::exp(x) * scale : 0.0;
          const double dlog = s <= t ? dc * weights[row + s] : 0.0;
          sum += dlog;
          col[s] += dlog;
        }
        row_sums[i * T + t] = sum;
      }
    }
  });
}

void check_slices(const at::Tensor& t, int64_t n, int64_t len, const char* what) {
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.numel() == n * len, what, " has ", t.numel(), " elements, expected ", n * len);
}

// The checks of the O(T) vectors (a, row_max, m; in backward also row_sum, normaliser): (B, H, T) fp32 contiguous
void check_vectors(std::initializer_list<std::pair<const at::Tensor*, const char*>> vectors, int64_t n, int64_t T) {
  for (const auto& [x, what] : vectors) {
    check_slices(*x, n, T, what);
    TORCH_CHECK(x->scalar_type() == at::kFloat, what, " must be float32");
  }
}

// scores (..., T, T) fp32/fp64; a, row_max (..., T) same dtype; weights (..., T, T) in the scores' dtype or bf16.
// Returns row_sum (..., T).
at::Tensor weights_forward(const at::Tensor& scores, const at::Tensor& a, const at::Tensor& row_max, double scale,
                           at::Tensor weights) {
  const int64_t T = scores.size(-1);
  const int64_t n = scores.numel() / (T * T);
  check_slices(scores, n, T * T, "scores");
  check_slices(weights, n, T * T, "weights");
  check_slices(a, n, T, "a");
  check_slices(row_max, n, T, "row_max");
  TORCH_CHECK(a.scalar_type() == scores.scalar_type() && row_max.scalar_type() == scores.scalar_type(),
              "a and row_max must have the scores' dtype");
  auto row_sum = at::empty(a.sizes(), a.options());
  if (scores.scalar_type() == at::kDouble) {
    TORCH_CHECK(weights.scalar_type() == at::kDouble, "float64 scores need float64 weights");
    forward_f64(scores.data_ptr<double>(), a.data_ptr<double>(), row_max.data_ptr<double>(), scale,
                weights.data_ptr<double>(), row_sum.data_ptr<double>(), n, T);
  } else {
    TORCH_CHECK(scores.scalar_type() == at::kFloat, "scores must be float32 or float64, got ", scores.scalar_type());
    const float* s = scores.data_ptr<float>();
    const float* pa = a.data_ptr<float>();
    const float* pm = row_max.data_ptr<float>();
    float* rs = row_sum.data_ptr<float>();
    if (weights.scalar_type() == at::kFloat) {
      forward_f32<float>(s, pa, pm, static_cast<float>(scale), weights.data_ptr<float>(), rs, n, T);
    } else {
      TORCH_CHECK(weights.scalar_type() == at::kBFloat16, "weights must be float32 or bfloat16");
      forward_f32<at::BFloat16>(s, pa, pm, static_cast<float>(scale), weights.data_ptr<at::BFloat16>(), rs, n,
                                T);
    }
  }
  return row_sum;
}

// grad_c, weights (..., T, T) in the products' dtype (fp32, fp64 or bf16); grad_row_sum, a, row_max (..., T) in the
// accumulation dtype. Returns (grad_scores (..., T, T) in the products' dtype, row sums, column sums (..., T)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> weights_backward(const at::Tensor& grad_c,
                                                                const at::Tensor& grad_row_sum,
                                                                const at::Tensor& weights, const at::Tensor& a,
                                                                const at::Tensor& row_max, double scale) {
  const int64_t T = grad_c.size(-1);
  const int64_t n = grad_c.numel() / (T * T);
  check_slices(grad_c, n, T * T, "grad_c");
  check_slices(weights, n, T * T, "weights");
  check_slices(grad_row_sum, n, T, "grad_row_sum");
  check_slices(a, n, T, "a");
  check_slices(row_max, n, T, "row_max");
  TORCH_CHECK(weights.scalar_type() == grad_c.scalar_type(), "weights and grad_c must share a dtype");
  TORCH_CHECK(grad_row_sum.scalar_type() == a.scalar_type() && row_max.scalar_type() == a.scalar_type(),
              "grad_row_sum, a and row_max must share a dtype");
  auto grad_scores = at::empty(grad_c.sizes(), grad_c.options());
  auto row_sums = at::empty(a.sizes(), a.options());
  auto col_sums = at::empty(a.sizes(), a.options());
  if (a.scalar_type() == at::kDouble) {
    TORCH_CHECK(grad_c.scalar_type() == at::kDouble, "float64 gates need float64 products");
    backward_f64(grad_c.data_ptr<double>(), grad_row_sum.data_ptr<double>(), weights.data_ptr<double>(),
                 a.data_ptr<double>(), row_max.data_ptr<double>(), scale, grad_scores.data_ptr<double>(),
                 row_sums.data_ptr<double>(), col_sums.data_ptr<double>(), n, T);
  } else {
    TORCH_CHECK(a.scalar_type() == at::kFloat, "gates must be float32 or float64, got ", a.scalar_type());
    const float* g = grad_row_sum.data_ptr<float>();
    const float* pa = a.data_ptr<float>();
    const float* pm = row_max.data_ptr<float>();
    float* rs = row_sums.data_ptr<float>();
    float* cs = col_sums.data_ptr<float>();
    const float sc = static_cast<float>(scale);
    if (grad_c.scalar_type() == at::kFloat) {
      backward_f32<float>(grad_c.data_ptr<float>(), g, weights.data_ptr<float>(), pa, pm, sc,
                          grad_scores.data_ptr<float>(), rs, cs, n, T);
    } else {
      TORCH_CHECK(grad_c.scalar_type() == at::kBFloat16, "products must be float32, float64 or bfloat16");
      backward_f32<at::BFloat16>(grad_c.data_ptr<at::BFloat16>(), g, weights.data_ptr<at::BFloat16>(), pa, pm, sc,
                                 grad_scores.data_ptr<at::BFloat16>(), rs, cs, n, T);
    }
  }
  return {grad_scores, row_sums, col_sums};
}

// Whether the scores can go through ATen's brgemm on AMX tiles: a CPU with AMX and oneDNN enabled (could_pack asks
// both). Else weights_forward_qk uses AVX512-BF16 dot products.
bool can_use_tiles() { return at::native::cpublas::could_pack(at::kBFloat16); }

#if defined(__AVX512BF16__)
// The bf16 products of the forward with AVX512-BF16 pair dot products (CPUs without AMX tiles: AMD Zen 4 and
// later, Intel Cooper Lake): each output is an fp32 accumulator that adds q_t[2j] k_s[2j] + q_t[2j+1] k_s[2j+1]
// for j = 0, 1, ... in turn (exact bf16 x bf16 products; only the summation order differs from an fp32 GEMM of
// the upcast rows). Every output block is an R x NB tile of 16-lane accumulators kept in registers for the whole
// sum: each packed load of k is shared by R rows and each broadcast pair of q by NB blocks, and 12-16 independent
// accumulators hide the dot product's latency. Blocks wholly above the diagonal (s > t) are not computed.

// 16 x 16 32-bit transpose in registers (interleave 32-bit, then 64-bit, then 128-bit lanes twice)
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 4) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    t[i + 2] = _mm512_unpacklo_epi32(r[i + 2], r[i + 3]);
    t[i + 3] = _mm512_unpackhi_epi32(r[i + 2], r[i + 3]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// packed[j][s] = (k[s][2j], k[s][2j + 1]) for s < T, zeros for T <= s < padded: the pairs of k's columns that the
// dot products and the tile GEMM (its VNNI layout for B) read. k_i: a (T, DH) slice, rows k_stride apart. 16 tokens
// x 16 pairs at a time through a register transpose.
inline void pack_k_pairs(const at::BFloat16* k_i, int64_t k_stride, int64_t T, int64_t pairs, int64_t padded,
                              uint32_t* packed) {
  for (int64_t s0 = 0; s0 < padded; s0 += kLanes) {
    for (int64_t j0 = 0; j0 < pairs; j0 += kLanes) {
      const int64_t nj = std::min(kLanes, pairs - j0);
      const __mmask16 mask = static_cast<__mmask16>((1u << nj) - 1u);
      __m512i r[16];
      for (int64_t i = 0; i < kLanes; ++i) {
        r[i] = s0 + i < T ? _mm512_maskz_loadu_epi32(mask, k_i + (s0 + i) * k_stride + 2 * j0)
                          : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int64_t j = 0; j < nj; ++j) _mm512_storeu_si512(packed + (j0 + j) * padded + s0, r[j]);
    }
  }
}

// packed[j][d] = (x[2j][d], x[2j + 1][d]) for pairs j < (rows + 1) / 2 and columns d < cols (0 for the row past an
// odd `rows`): pairs of x's rows, the VNNI layout of the tile GEMM's B and what the pair dot products read. x's rows
// are x_ld apart, packed's ld apart; lanes cols .. ld - 1 are left as they are (zeros from the caller, once).
inline void pack_row_pairs(const at::BFloat16* x, int64_t x_ld, int64_t rows, int64_t cols, uint32_t* packed,
                           int64_t ld) {
  for (int64_t j = 0; 2 * j < rows; ++j) {
    const at::BFloat16* even = x + 2 * j * x_ld;
    const at::BFloat16* odd = 2 * j + 1 < rows ? even + x_ld : nullptr;
    for (int64_t d0 = 0; d0 < cols; d0 += kLanes) {
      const __mmask16 mask = static_cast<__mmask16>((1u << std::min(kLanes, cols - d0)) - 1u);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, even + d0));
      const __m512i hi = odd ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, odd + d0)) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(packed + j * ld + d0, mask, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

// out[r][16-lane vectors n < N] = sum_{p < count} A_r[pair p] . B[p][lanes of vector n], for rows r < rows <= R
// of A (bf16, rows a_stride apart; past `rows` the last row is repeated, its sums unused) and B packed in pairs
// (uint32 rows b_ld apart), into out (rows out_ld floats apart). Both products of the forward are such tiles:
// S = q k^T (A = q, B = k's pairs of columns, count = DH / 2) and C v (A = C, B = v's pairs of rows, count up to
// the diagonal).
template <int R, int N>
inline void pair_dot_tile(const at::BFloat16* a, int64_t a_stride, int64_t rows, const uint32_t* b, int64_t b_ld,
                          int64_t count, float* out, int64_t out_ld) {
  __m512 acc[R][N];
  const at::BFloat16* a_rows[R];
  for (int r = 0; r < R; ++r) {
    a_rows[r] = a + std::min<int64_t>(r, rows - 1) * a_stride;
    for (int n = 0; n < N; ++n) acc[r][n] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < count; ++p) {
    __m512i bv[N];
    for (int n = 0; n < N; ++n) bv[n] = _mm512_loadu_si512(b + p * b_ld + n * kLanes);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a_rows[r] + 2 * p, 4);
      const __m512bh ab = (__m512bh)_mm512_set1_epi32(pair);
      for (int n = 0; n < N; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], ab, (__m512bh)bv[n]);
    }
  }
  for (int r = 0; r < R && r < rows; ++r) {
    for (int n = 0; n < N; ++n) _mm512_storeu_ps(out + r * out_ld + n * kLanes, acc[r][n]);
  }
}

// S = q k^T (T x padded fp32; blocks wholly above the diagonal are left unwritten) from a slice of q (rows q_stride
// apart) and k packed by pack_k_pairs. Per 16 rows: the blocks up to their diagonal, four at a time in 4 x 4 tiles,
// then two in 8 x 2 tiles, then one in 8 x 1 tiles.
inline void scores_dots(const at::BFloat16* q_i, int64_t q_stride, const uint32_t* packed, int64_t T, int64_t pairs,
                        int64_t padded, float* scores) {
  for (int64_t t0 = 0; t0 < T; t0 += kLanes) {
    const int64_t rows = std::min(kLanes, T - t0);
    const int64_t blocks = (t0 + rows - 1) / kLanes + 1;
    // R x N tiles over the 16 rows for blocks c .. c + N - 1: A = those rows of q, B and out from block c's lanes
    auto tiles = [&](auto height, auto width, int64_t c) {
      constexpr int R = decltype(height)::value, N = decltype(width)::value;
      for (int64_t r = 0; r < rows; r += R) {
        pair_dot_tile<R, N>(q_i + (t0 + r) * q_stride, q_stride, std::min<int64_t>(R, rows - r), packed + c * kLanes,
                            padded, pairs, scores + (t0 + r) * padded + c * kLanes, padded);
      }
    };
    int64_t c = 0;
    for (; c + 4 <= blocks; c += 4) tiles(std::integral_constant<int, 4>{}, std::integral_constant<int, 4>{}, c);
    for (; c + 2 <= blocks; c += 2) tiles(std::integral_constant<int, 8>{}, std::integral_constant<int, 2>{}, c);
    for (; c < blocks; ++c) tiles(std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{}, c);
  }
}

// out (T x dhp fp32) = A B for a T x T' bf16 A (rows a_ld apart, T' = T rounded up to even) that is zero above
// its diagonal (lower: C, dS) or below it (upper: C^T, dS^T), B packed in pairs of rows (pack_row_pairs, rows dhp
// apart), with the pair dot products: only the pairs of tokens where A's rows can be nonzero are summed.
inline void triangle_dots(const at::BFloat16* a, int64_t a_ld, int64_t T, bool upper, const uint32_t* b,
                          int64_t dhp, float* out) {
  const int64_t vectors = dhp / kLanes, chunks = (vectors + 3) / 4, per = (vectors + chunks - 1) / chunks;
  const int64_t token_pairs = (T + 1) / 2;
  for (int64_t t0 = 0; t0 < T; t0 += 4) {
    const int64_t rows = std::min<int64_t>(4, T - t0);
    // lower: pairs 0 .. up to the last row's diagonal; upper: from the first row's diagonal (t0 is even) to the end
    const int64_t first = upper ? t0 / 2 : 0, count = upper ? token_pairs - first : (t0 + rows - 1) / 2 + 1;
    for (int64_t v0 = 0; v0 < vectors; v0 += per) {
      const at::BFloat16* a_rows = a + t0 * a_ld + 2 * first;
      const uint32_t* b_pairs = b + first * dhp + v0 * kLanes;
      float* o = out + t0 * dhp + v0 * kLanes;
      switch (std::min(per, vectors - v0)) {
        case 1: pair_dot_tile<4, 1>(a_rows, a_ld, rows, b_pairs, dhp, count, o, dhp); break;
        case 2: pair_dot_tile<4, 2>(a_rows, a_ld, rows, b_pairs, dhp, count, o, dhp); break;
        case 3: pair_dot_tile<4, 3>(a_rows, a_ld, rows, b_pairs, dhp, count, o, dhp); break;
        default: pair_dot_tile<4, 4>(a_rows, a_ld, rows, b_pairs, dhp, count, o, dhp); break;
      }
    }
  }
}

// S = q k^T (T x padded fp32) of one slice: k packed into `packed` (pairs x padded), then the tile GEMM (AMX, its
// VNNI layout for B) or the dot products. The scores step of both forward kernels below.
inline void slice_scores(const at::BFloat16* q_i, int64_t q_stride, const at::BFloat16* k_i, int64_t k_stride,
                         int64_t T, int64_t DH, int64_t padded, bool tiles, uint32_t* packed, float* scores) {
  pack_k_pairs(k_i, k_stride, T, DH / 2, padded, packed);
  if (tiles) {
    at::native::cpublas::brgemm(T, padded, DH, q_stride, padded, padded, false, q_i,
                                reinterpret_cast<const at::BFloat16*>(packed), scores, true);
  } else {
    scores_dots(q_i, q_stride, packed, T, DH / 2, padded, scores);
  }
}

// Forward from bf16 q and k (under autocast the projections' outputs): the scores S = q k^T summed in fp32 (AMX
// tiles through ATen's brgemm where the CPU has them and `tiles`, else the dot products above), then C = S * D' and
// its row sums as in forward_f32 (forward_row), without writing S to memory, and without the fp32 copies of q and
// k that PyTorch would need for fp32 scores. q and k are read through their strides (rows with a unit last
// stride), so head views of token-major memory need no copy either. Per slice, k is packed once into pairs
// [DH / 2][T'] (T' = T rounded up to 16 lanes), the layout both the tile GEMM (its VNNI layout for B) and the pair
// dot products read.
void forward_qk_bf16(const at::Tensor& q, const at::Tensor& k, const float* a, const float* row_max, float scale,
                     at::BFloat16* weights, float* row_sum, bool tiles) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), DH = q.size(3);
  const int64_t pairs = DH / 2, blocks = (T + kLanes - 1) / kLanes, padded = blocks * kLanes;
  const auto* pq = q.data_ptr<at::BFloat16>();
  const auto* pk = k.data_ptr<at::BFloat16>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> packed(pairs * padded);
    std::vector<float> scores(T * padded);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, hh = i % H;
      const at::BFloat16* q_i = pq + b * q.stride(0) + hh * q.stride(1);
      const at::BFloat16* k_i = pk + b * k.stride(0) + hh * k.stride(1);
      slice_scores(q_i, q.stride(2), k_i, k.stride(2), T, DH, padded, tiles, packed.data(), scores.data());
      const float* a_i = a + i * T;
      for (int64_t t = 0; t < T; ++t) {
        row_sum[i * T + t] = forward_row(scores.data() + t * padded, a_i, row_max[i * T + t], scale,
                                         weights + (i * T + t) * T, t, T);
      }
    }
    if (tiles) at::native::cpublas::brgemm_release(true);  // hand the tile registers back (as ATen's own users do)
  });
}
#endif

bool has_bf16_scores() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// Whether weights_forward_qk(tiles=True) runs on AMX tiles here.
bool has_tile_scores() { return has_bf16_scores() && can_use_tiles(); }

// The fp32 lanes of the kernels' vectors (vec.h): the block-diagonal kernels take blocks of up to this many channels
int64_t vector_lanes() { return kLanes; }

// out (T x DH, rows out_ld apart; bf16 or fp32 as x) = the block-diagonal product of one head's slice x (T rows,
// `stride` apart) with a weight table (blockdiag.h, at the head's first channel) plus bias (fp32 at that channel, or
// null): the sum block_diag_mm makes for one input, rounded once, so the same bits.
// Vector by vector of channels, all T rows each: the table's and the bias's vectors are loaded once per slice (row
// by row they were loaded again for every row, most of the loop's loads).
template <int BS, typename E>
void project_slice(const E* x, int64_t stride, const float* table, int64_t C, const float* bias, E* out,
                   int64_t out_ld, int64_t T, int64_t DH) {
  for_vectors(DH, [&](int64_t d0, auto count) {
    vfloat w[BS];
    for (int s = 0; s < BS; ++s) w[s] = load(table + s * C + d0, count);
    const vfloat start = bias ? load(bias + d0, count) : vfloat{};
    for (int64_t t = 0; t < T; ++t) {
      vfloat sum = start;
      sum += mm_loaded<BS>(load(x + t * stride + d0, count), w, Shifts<BS>{});
      store(out + t * out_ld + d0, sum, count);
    }
  });
}

// The cell's q = Wq c + bq, k = Wk c + bk, v = Wv x_m + bv (block-diagonal W, the ViL layer's projections) for
// the projected kernels (forward_bf16_projected, forward_fp32_projected and their backwards): the weights as
// blockdiag.h's fp32 tables (C channels each), the biases in fp32 (or empty).
struct Projections {
  int64_t bs, C;
  std::vector<float> tables[3], biases[3];

  // Product p (0: q, 1: k, 2: v) of the slice whose first channel is `channel`: x its source's rows, out's rows
  // out_ld apart
  template <typename E>
  void slice(int p, const E* x, int64_t stride, int64_t channel, int64_t T, int64_t DH, E* out,
             int64_t out_ld) const {
    const float* bias = biases[p].empty() ? nullptr : biases[p].data() + channel;
    with_block_size(bs, [&](auto block) {
      project_slice<decltype(block)::value>(x, stride, tables[p].data() + channel, C, bias, out, out_ld, T, DH);
    });
  }

  // q, k, v of a slice from its sources' rows (rows[p], strides[p] apart) into `buffer` (3 T x DH, rows DH apart);
  // rows and strides are then q's, k's and v's there
  void slices(const at::BFloat16* rows[3], int64_t strides[3], int64_t channel, int64_t T, int64_t DH,
              at::BFloat16* buffer) const {
    for (int p = 0; p < 3; ++p) {
      slice(p, rows[p], strides[p], channel, T, DH, buffer + p * T * DH, DH);
      rows[p] = buffer + p * T * DH;
      strides[p] = DH;
    }
  }
};

// For NIN gradients g_j of products out_j = blockdiag(W_j) x (one head's slice: T rows, DH channels from the
// head's first; g_j's rows ld apart, x's x_stride apart): writes sum_j blockdiag(W_j)^T g_j (x's gradient through
// them, rows out_stride apart) and adds each product's weight and bias sums, sum_t g_j[t, c] x[t, rotate_s(c)] and
// sum_t g_j[t, c], to sums[j] (blockdiag_cpu.cpp's table form: BS + 1 rows of C at the head's first channel).
// tables_t[j] is W_j^T's table at that channel. The same arithmetic as block_diag_mm's sum of the two products and
// block_diag_outer's sums, taken while the slice is in cache. Per vector of channels, all T rows: the tables stay in
// registers, and NIN (BS + 1) accumulators.
template <int BS, int NIN, typename E, int... S>
inline void source_grads_slice(const float* const* g, int64_t ld, const E* x, int64_t x_stride,
                               const float* const* tables_t, int64_t C, E* out, int64_t out_stride,
                               float* const* sums, int64_t T, int64_t DH, std::integer_sequence<int, S...>) {
  // (the pointers and strides copied into the lambda's locals: read through its captures, they were loaded again
  // after every store, which the compiler must assume may change them)
  for_vectors(DH, [=](int64_t d0, auto count) {
    const float* rows_g[NIN];
    vfloat w[NIN][BS], acc[NIN][BS] = {}, col[NIN] = {};
#pragma GCC unroll 2
    for (int j = 0; j < NIN; ++j) {
      rows_g[j] = g[j] + d0;
#pragma GCC unroll 8
      for (int s = 0; s < BS; ++s) w[j][s] = load(tables_t[j] + s * C + d0, count);
    }
    const E* rows_x = x + d0;
    E* rows_out = out + d0;
    const int64_t g_ld = ld, x_ld = x_stride, out_ld = out_stride, n = T;
    for (int64_t t = 0; t < n; ++t) {
      const vfloat xv = load(rows_x + t * x_ld, count);
      const vfloat xr[BS] = {rotate<BS, S>(xv)...};
      vfloat sum{};
#pragma GCC unroll 2
      for (int j = 0; j < NIN; ++j) {
        const vfloat gv = load(rows_g[j] + t * g_ld, count);
        ((acc[j][S] += gv * xr[S]), ...);
        col[j] += gv;
        sum += mm_loaded<BS>(gv, w[j], Shifts<BS>{});
      }
      store(rows_out + t * out_ld, sum, count);
    }
#pragma GCC unroll 2
    for (int j = 0; j < NIN; ++j) {
#pragma GCC unroll 8
      for (int s = 0; s < BS; ++s) store(sums[j] + s * C + d0, load(sums[j] + s * C + d0, count) + acc[j][s], count);
      store(sums[j] + BS * C + d0, load(sums[j] + BS * C + d0, count) + col[j], count);
    }
  });
}

// The sources' gradients for backward_fp32_projected_sources and backward_bf16_projected_sources: rather than
// writing q's, k's and v's gradients for the projections' passes to read back (block_diag_mm for c's and x_m's
// gradients, block_diag_outer three times for the weights'), the cell's backward takes them from each slice's dQ,
// dK, dV (fp32 sums) while those are in cache: c's gradient through q and k, x_m's through v (token-major (B, T, C)
// in the sources' dtype, the head's channels of each row, each element rounded once), and the weight and bias sums
// in per-thread fp32 tables.
struct SourceGrads {
  void *grad_c, *grad_x_m;  // (float or at::BFloat16, the sources' dtype)
  int64_t T, C, bs, threads;
  std::vector<float> tables_t[3];  // W^T's tables (blockdiag.h) for q, k, v
  std::vector<float> partial;      // per thread: 3 tables of bs + 1 rows of C

  // x's gradient through NIN of the products (p: 0 q, 1 k, 2 v; NIN = 2: q and k, from c) for slice (b, channel):
  // g their gradients' T rows (fp32), ld apart; x the source's rows, x_stride apart; out the gradient's (B, T, C)
  // memory, in x's dtype E
  template <typename E>
  void slice(int nin, const int* p, const float* const* g, int64_t ld, const E* x, int64_t x_stride, void* out,
             int64_t b, int64_t channel, int64_t DH) {
    float* mine = partial.data() + at::get_thread_num() * 3 * (bs + 1) * C;
    const float* tables[2];
    float* sums[2];
    for (int j = 0; j < nin; ++j) {
      tables[j] = tables_t[p[j]].data() + channel;
      sums[j] = mine + p[j] * (bs + 1) * C + channel;
    }
    E* rows = static_cast<E*>(out) + b * T * C + channel;
    with_block_size(bs, [&](auto block) {
      constexpr int BS = decltype(block)::value;
      if (nin == 2)
        source_grads_slice<BS, 2>(g, ld, x, x_stride, tables, C, rows, C, sums, T, DH, Shifts<BS>{});
      else
        source_grads_slice<BS, 1>(g, ld, x, x_stride, tables, C, rows, C, sums, T, DH, Shifts<BS>{});
    });
  }

  // x_m's gradient through v from slice (b, head)'s dV (T rows of fp32 sums, ld apart), and v's weight sums; x_m's
  // rows x_stride apart
  template <typename E>
  void through_v(const float* dv, int64_t ld, const E* x_m, int64_t x_stride, int64_t b, int64_t head, int64_t DH) {
    const int p[1] = {2};
    const float* g[1] = {dv};
    slice(1, p, g, ld, x_m, x_stride, grad_x_m, b, head * DH, DH);
  }

  // c's gradient through q and k from the slice's dQ and dK (as dV above), and their weight sums
  template <typename E>
  void through_q_k(const float* dq, const float* dk, int64_t ld, const E* c, int64_t c_stride, int64_t b,
                   int64_t head, int64_t DH) {
    const int p[2] = {0, 1};
    const float* g[2] = {dq, dk};
    slice(2, p, g, ld, c, c_stride, grad_c, b, head * DH, DH);
  }
};

// The layer's output path after the cell, y = (HeadNorm(h) * (1 + w) + b + skip * c) * SiLU(z) (headnorm.h), for
// the inference kernels that end with it (forward_fp32_projected_gated, forward_bf16_projected_gated): each row of
// h goes from registers and a row buffer straight into y, never to memory, and layer_cpu.cpp's gated_norm pass
// (which would read h, c and z back and write y) is not needed. c, z, y: (B, T, C) contiguous in the kernel's dtype;
// scale = 1 + w, bias (zeros without one), skip: (C,) fp32.
struct GatedOutput {
  at::Tensor c, z, y, scale, bias, skip;  // (held: the pointers below point into them)
  float eps;
  const void *c_data, *z_data;
  void* y_data;
  const float *scale_data, *bias_data, *skip_data;
  int64_t T, C;

  GatedOutput(at::Tensor c_, at::Tensor z_, at::Tensor y_, at::Tensor scale_, at::Tensor bias_, at::Tensor skip_,
              float eps_)
      : c(std::move(c_)), z(std::move(z_)), y(std::move(y_)), scale(std::move(scale_)), bias(std::move(bias_)),
        skip(std::move(skip_)), eps(eps_), c_data(c.data_ptr()), z_data(z.data_ptr()), y_data(y.data_ptr()),
        scale_data(scale.data_ptr<float>()), bias_data(bias.data_ptr<float>()), skip_data(skip.data_ptr<float>()),
        T(c.size(1)), C(c.size(2)) {}

  // asks the cache for z's rows of slice (b, channel): read at the slice's end, from memory
  template <typename E>
  void prefetch(int64_t b, int64_t channel, int64_t DH) const {
    prefetch_rows(static_cast<const E*>(z_data) + b * T * C + channel, C, T, DH);
  }

  // y's rows (b, 0 .. T - 1) for one head (channels channel .. channel + DH - 1) from that head's T rows of h (ld
  // apart), in the kernel's dtype E: gated_norm_forward's arithmetic, so its bits. All rows' statistics first (into
  // `stats`, 2 T floats), as gated_norm_forward does for its heads: each is a chain of dependent steps, and the
  // chains of different rows overlap when nothing else sits between them. Raw pointers: Tensor's accessors would
  // cost a share of the kernel, as their strides did. (A first version, row by row with Tensor's accessors per row,
  // inferred the MNIST recipe's model, DH = 32, at 0.87x: results/benchmarks/ab-session37-gated-fp32-infer.md.)
  template <typename E>
  void rows(const E* h, int64_t ld, int64_t b, int64_t T_rows, int64_t channel, int64_t DH, float* stats) const {
    for (int64_t t = 0; t < T_rows; ++t) head_stats(h + t * ld, DH, eps, stats[2 * t], stats[2 * t + 1]);
    for (int64_t t = 0; t < T_rows; ++t) {
      const int64_t offset = (b * T + t) * C + channel;
      gated_head_out(h + t * ld, static_cast<const E*>(c_data) + offset, static_cast<const E*>(z_data) + offset,
                     scale_data + channel, bias_data + channel, skip_data + channel, stats[2 * t],
                     stats[2 * t + 1], DH, static_cast<E*>(y_data) + offset);
    }
  }
};

#if defined(__AVX512BF16__)
// The whole forward of the cell (eqs. 59-64) for bf16 q, k, v, one slice at a time with every intermediate in
// cache: S = q k^T (fp32), C = S D' and its row sums (forward_row), the normaliser n = max(|row sum|, exp(-m)), the
// numerator C v (from C rounded to bf16 as the PyTorch form rounds it for its bf16 product, summed in fp32) and
// h = (C v) / (n + eps), rounded once to bf16. The products run on AMX tiles (ATen's brgemm) where the CPU has them
// and `tiles`, else as the AVX512-BF16 dot products above. C is written out only when backward needs it
// (weights != nullptr). q, k, v are read and h written through their strides.
// With `projections`, q, k and v are not the cell's inputs but their sources (see Projections), and each slice's
// q, k, v are computed into per-thread buffers first.
void forward_whole_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* a,
                        const float* row_max, const float* m, float scale, float eps, at::BFloat16* weights,
                        float* row_sum, float* normaliser, const at::Tensor& h, bool tiles,
                        const Projections* projections = nullptr, const GatedOutput* gate = nullptr) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), DH = q.size(3);
  const int64_t pairs = DH / 2;
  const int64_t padded = (T + kLanes - 1) / kLanes * kLanes;  // S's columns: whole 16-lane blocks
  const int64_t token_pairs = (T + 1) / 2;  // the K axis of C v, in pairs of tokens
  // v_packed's row length: DH for the tile GEMM, whole 16-lane vectors (zeros past DH) for the dot products
  const int64_t dhp = tiles ? DH : (DH + kLanes - 1) / kLanes * kLanes;
  const auto* pq = q.data_ptr<at::BFloat16>();
  const auto* pk = k.data_ptr<at::BFloat16>();
  const auto* pv = v.data_ptr<at::BFloat16>();
  auto* ph = h.data_ptr<at::BFloat16>();
  // the strides, read once (Tensor::stride() in the loops below was a measurable share of the kernel's time)
  const int64_t q0 = q.stride(0), q1 = q.stride(1), q2 = q.stride(2), k0 = k.stride(0), k1 = k.stride(1),
                k2 = k.stride(2), v0 = v.stride(0), v1 = v.stride(1), v2 = v.stride(2), h0 = h.stride(0),
                h1 = h.stride(1), h2 = h.stride(2);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> k_packed(pairs * padded);  // [DH / 2][padded] (pack_k_pairs)
    std::vector<uint32_t> v_packed(token_pairs * dhp, 0);  // [T / 2][dhp]: pairs of v's rows (tokens), per column
    std::vector<float> scores(T * padded);
    std::vector<at::BFloat16> c(T * 2 * token_pairs, at::BFloat16(0.0f));  // C in bf16, rows of 2 * token_pairs
    std::vector<float> num(T * dhp);
    std::vector<at::BFloat16> projected(projections ? 3 * T * DH : 0);  // q, k, v of the slice, rows DH apart
    // with `gate`: the slice's h, rounded as h would be stored, and its rows' statistics
    std::vector<at::BFloat16> h_rows(gate ? T * DH : 0);
    std::vector<float> stats(gate ? 2 * T : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, hh = i % H;
      const at::BFloat16* rows[3] = {pq + b * q0 + hh * q1, pk + b * k0 + hh * k1, pv + b * v0 + hh * v1};
      int64_t strides[3] = {q2, k2, v2};
      at::BFloat16* h_i = ph + b * h0 + hh * h1;
      // The next slice's rows, requested while this one computes: rows of head views are short and strided, which
      // the hardware prefetchers miss (ViL-T's shape on Zen 4, inputs from memory: 4.7-5.0 ms per call without
      // this, 3.7-3.8 with it; 1.7-1.8 with all inputs in cache; 2 slices ahead was no better, 4 or 8 worse).
      if (i + 1 < end) {
        const int64_t nb = (i + 1) / H, nh = (i + 1) % H;
        prefetch_rows(pq + nb * q0 + nh * q1, q2, T, DH);
        prefetch_rows(pk + nb * k0 + nh * k1, k2, T, DH);
        prefetch_rows(pv + nb * v0 + nh * v1, v2, T, DH);
        prefetch_rows(ph + nb * h0 + nh * h1, h2, T, DH);
        if (gate) gate->prefetch<at::BFloat16>(nb, nh * DH, DH);
      }
      if (projections) projections->slices(rows, strides, hh * DH, T, DH, projected.data());
      const at::BFloat16 *q_i = rows[0], *k_i = rows[1], *v_i = rows[2];
      const int64_t q_rows = strides[0], k_rows = strides[1], v_rows = strides[2];
      slice_scores(q_i, q_rows, k_i, k_rows, T, DH, padded, tiles, k_packed.data(), scores.data());
      pack_row_pairs(v_i, v_rows, T, DH, v_packed.data(), dhp);  // v's pairs of rows (tokens); 0 past T
      const float* a_i = a + i * T;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = i * T + t;
        at::BFloat16* c_row = c.data() + t * 2 * token_pairs;
        row_sum[r] = forward_row(scores.data() + t * padded, a_i, row_max[r], scale, c_row, t, T);
        normaliser[r] = std::max(std::abs(row_sum[r]), std::exp(-m[r]));
        if (weights) std::memcpy(weights + r * T, c_row, T * sizeof(at::BFloat16));
      }
      if (tiles) {
        at::native::cpublas::brgemm(T, DH, 2 * token_pairs, 2 * token_pairs, DH, DH, false, c.data(),
                                    reinterpret_cast<const at::BFloat16*>(v_packed.data()), num.data(), true);
      } else {
        triangle_dots(c.data(), 2 * token_pairs, T, false, v_packed.data(), dhp, num.data());  // C v
      }
      const float* num_rows = num.data();
      for (int64_t t = 0; t < T; ++t) {
        const vfloat denom = splat(normaliser[i * T + t] + eps);
        at::BFloat16* out_row = gate ? h_rows.data() + t * DH : h_i + t * h2;
        const float* num_row = num_rows + t * dhp;
        for_vectors(DH, [&](int64_t d0, auto count) {
          store(out_row + d0, load(num_row + d0, count) / denom, count);
        });
      }
      if (gate) gate->rows(h_rows.data(), DH, b, T, hh * DH, DH, stats.data());
    }
    if (tiles) at::native::cpublas::brgemm_release(true);
  });
}
#endif

#if defined(__AVX512BF16__)
// ---- the whole backward in bf16 (backward_bf16) ----

// out[c][r] = x[r][c] for a rows x cols bf16 block (x's rows x_ld apart, out's out_ld apart), with out[c][rows] = 0
// for odd `rows` (the products' K axis runs over pairs): 32 rows x 16 columns at a time, as pairs of rows
// interleaved into 32-bit lanes, then transpose16.
inline void transpose_bf16(const at::BFloat16* x, int64_t x_ld, int64_t rows, int64_t cols, at::BFloat16* out,
                           int64_t out_ld) {
  const int64_t even = rows + (rows & 1);
  for (int64_t r0 = 0; r0 < even; r0 += 2 * kLanes) {
    const int64_t n = std::min<int64_t>(2 * kLanes, even - r0);
    const __mmask32 store_mask = n == 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1u);
    for (int64_t c0 = 0; c0 < cols; c0 += kLanes) {
      const int64_t nc = std::min(kLanes, cols - c0);
      const __mmask16 mask = static_cast<__mmask16>((1u << nc) - 1u);
      __m512i reg[16];
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t r = r0 + 2 * j;
        const __m512i lo = r < rows ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x + r * x_ld + c0))
                                    : _mm512_setzero_si512();
        const __m512i hi = r + 1 < rows
                               ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x + (r + 1) * x_ld + c0))
                               : _mm512_setzero_si512();
        reg[j] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
      }
      transpose16(reg);
      for (int64_t c = 0; c < nc; ++c) _mm512_mask_storeu_epi16(out + (c0 + c) * out_ld + r0, store_mask, reg[c]);
    }
  }
}

// The whole backward of the cell (the gradients of eqs. 59-64) for bf16 q, k, v, slice by slice with every T x T
// intermediate in cache, where the PyTorch form makes four batched products and two fused passes over memory:
//   dN = dh / (n + eps) (as dh times 1 / (n + eps), rounded to bf16: vdivps per element was a tenth of the
//   kernel's time), the normaliser's gradient -(dN . h) split between
//   the row sum (grad_row_sum, where |row sum| is the larger side) and the stabiliser (grad_m, where exp(-m) is);
//   dV = C^T dN; G = dN v^T (fp32, not rounded); dC = G + grad_row_sum, dS = dC D' (bf16) and d log D = dC C as
//   row and column sums (as weights_backward); dQ = dS k; dK = dS^T q.
// The four products run on AMX tiles (ATen's brgemm) where the CPU has them and `tiles`, else as the AVX512-BF16
// pair dot products (over the nonzero triangles only). C is the forward's (saved in bf16). q, k, v, dh, h are
// read and dq, dk, dv written through their strides (unit last ones). Writes grad_m and the row and column sums
// of d log D, (B, H, T) fp32 each. With `projections`, q, k and v are their sources (as in forward_whole_bf16)
// and each slice's q, k, v are computed into a per-thread buffer first. Like forward_whole_bf16 it asks for the
// next slice's rows of q (or c), v (or x_m), dh and h while it computes (in a ViL-T training step on the AMX host,
// ad hoc: 5.65-5.79 against 5.89-6.08 ms per call without; into L2 only, 5.77-5.88).
// With `source_grads` (and projections) it also takes the projections' backward, as backward_whole_f32 does: from
// each slice's dV, and dQ with dK, in fp32 while they are in cache, x_m's and c's gradients (bf16, rounded once)
// and the weights' sums; dq, dk, dv are not written.
void backward_whole_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_h,
                         const at::Tensor& h, const at::BFloat16* weights, const float* a, const float* row_max,
                         const float* m, const float* row_sum, const float* normaliser, float scale, float eps,
                         const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
                         float* grad_m, float* row_sums, float* col_sums, bool tiles,
                         const Projections* projections = nullptr, SourceGrads* source_grads = nullptr) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), DH = q.size(3);
  const int64_t pairs = DH / 2, token_pairs = (T + 1) / 2, tp = 2 * token_pairs;
  const int64_t blocks = (T + kLanes - 1) / kLanes, padded = blocks * kLanes;
  const int64_t dhp = tiles ? DH : (DH + kLanes - 1) / kLanes * kLanes;  // as in forward_whole_bf16
  using Rows = SliceRows<at::BFloat16>;
  const Rows rq = slice_rows<at::BFloat16>(q), rk = slice_rows<at::BFloat16>(k), rv = slice_rows<at::BFloat16>(v),
             rdh = slice_rows<at::BFloat16>(grad_h), rh = slice_rows<at::BFloat16>(h),
             rdq = slice_rows<at::BFloat16>(grad_q), rdk = slice_rows<at::BFloat16>(grad_k),
             rdv = slice_rows<at::BFloat16>(grad_v);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> dn(T * DH);                 // dN, rows DH apart: A of G = dN v^T
    std::vector<uint32_t> dn_pairs(token_pairs * dhp, 0);  // dN in pairs of rows: B of dV = C^T dN
    std::vector<uint32_t> v_cols(pairs * padded);         // v's pairs of columns (pack_k_pairs): B of G
    std::vector<uint32_t> x_pairs(token_pairs * dhp, 0);  // k, then q, in pairs of rows: B of dQ, dK
    std::vector<at::BFloat16> lhs(T * tp, at::BFloat16(0.0f));  // C^T, then dS^T: A of dV, dK (rows tp apart)
    std::vector<at::BFloat16> ds(T * tp, at::BFloat16(0.0f));   // dS: A of dQ
    std::vector<float> g(T * padded), out(T * dhp), grad_row_sum(T);
    std::vector<float> dq(source_grads ? T * dhp : 0);  // (with source_grads: dQ, kept for c's gradient with dK's)
    std::vector<vfloat> cols(blocks);
    std::vector<at::BFloat16> projected(projections ? 3 * T * DH : 0);  // q, k, v of the slice, rows DH apart
    // out (T x DH fp32 sums) rounded once into a slice of a gradient
    auto store_rows = [&](at::BFloat16* dst, int64_t stride) {
      for (int64_t t = 0; t < T; ++t) {
        for_vectors(DH, [&](int64_t d0, auto count) {
          store(dst + t * stride + d0, load(out.data() + t * dhp + d0, count), count);
        });
      }
    };
    // dst (T x DH fp32 sums, rows dhp apart) = A (T x tp, rows tp apart; lower or upper triangular) B (pairs of rows)
    auto product = [&](const at::BFloat16* lhs_rows, bool upper, const uint32_t* rhs, float* dst) {
      if (tiles) {
        at::native::cpublas::brgemm(T, DH, tp, tp, DH, DH, false, lhs_rows, reinterpret_cast<const at::BFloat16*>(rhs),
                                    dst, true);
      } else {
        triangle_dots(lhs_rows, tp, T, upper, rhs, dhp, dst);
      }
    };
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, hh = i % H;
      if (i + 1 < end) {  // (k's rows are c's too with projections)
        const int64_t nb = (i + 1) / H, nh = (i + 1) % H;
        for (const Rows* x : {&rq, &rv, &rdh, &rh}) prefetch_rows(x->slice(nb, nh), x->s2, T, DH);
      }
      const at::BFloat16* c_i = weights + i * T * T;
      const float* a_i = a + i * T;
      // q, k, v of the slice: read, or (projections) computed from their sources into `projected`
      const at::BFloat16* rows[3] = {rq.slice(b, hh), rk.slice(b, hh), rv.slice(b, hh)};
      int64_t strides[3] = {rq.s2, rk.s2, rv.s2};
      if (projections) projections->slices(rows, strides, hh * DH, T, DH, projected.data());
      const at::BFloat16 *q_i = rows[0], *k_i = rows[1], *v_i = rows[2];
      const int64_t q_rows = strides[0], k_rows = strides[1], v_rows = strides[2];
      // dN and the normaliser's gradient, row by row
      const at::BFloat16* dh_i = rdh.slice(b, hh);
      const at::BFloat16* h_i = rh.slice(b, hh);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = i * T + t;
        const vfloat inverse = splat(1.0f / (normaliser[r] + eps));
        at::BFloat16* dn_row = dn.data() + t * DH;
        vfloat dot{};
        for_vectors(DH, [&](int64_t d0, auto count) {
          store(dn_row + d0, load(dh_i + t * rdh.s2 + d0, count) * inverse, count);
          dot += load(dn_row + d0, count) * load(h_i + t * rh.s2 + d0, count);
        });
        normaliser_grads(-lane_sum(dot), row_sum[r], m[r], grad_row_sum[t], grad_m[r]);
      }
      // dV = C^T dN
      pack_row_pairs(dn.data(), DH, T, DH, dn_pairs.data(), dhp);
      transpose_bf16(c_i, T, T, T, lhs.data(), tp);
      product(lhs.data(), true, dn_pairs.data(), out.data());
      if (source_grads) {  // x_m's gradient through v, and v's weight sums
        source_grads->through_v(out.data(), dhp, rv.slice(b, hh), rv.s2, b, hh, DH);
      } else {
        store_rows(rdv.slice(b, hh), rdv.s2);
      }
      // G = dN v^T (fp32; on the dot products only the blocks up to the diagonal)
      pack_k_pairs(v_i, v_rows, T, pairs, padded, v_cols.data());
      if (tiles) {
        at::native::cpublas::brgemm(T, padded, DH, DH, padded, padded, false, dn.data(),
                                    reinterpret_cast<const at::BFloat16*>(v_cols.data()), g.data(), true);
      } else {
        scores_dots(dn.data(), DH, v_cols.data(), T, pairs, padded, g.data());
      }
      // dS = (G + grad_row_sum) D' and the sums of d log D = (G + grad_row_sum) C (backward_f32's row pass)
      std::fill(cols.begin(), cols.end(), vfloat{});
      for (int64_t t = 0; t < T; ++t) {
        row_sums[i * T + t] = backward_row(g.data() + t * padded, grad_row_sum[t], c_i + t * T, a_i,
                                           row_max[i * T + t], scale, ds.data() + t * tp, cols.data(), t, T);
      }
      for (int64_t blk = 0; blk < blocks; ++blk) {
        store(col_sums + i * T + blk * kLanes, cols[blk], std::min(kLanes, T - blk * kLanes));
      }
      // dQ = dS k
      pack_row_pairs(k_i, k_rows, T, DH, x_pairs.data(), dhp);
      product(ds.data(), false, x_pairs.data(), source_grads ? dq.data() : out.data());
      if (!source_grads) store_rows(rdq.slice(b, hh), rdq.s2);
      // dK = dS^T q
      transpose_bf16(ds.data(), tp, T, T, lhs.data(), tp);
      pack_row_pairs(q_i, q_rows, T, DH, x_pairs.data(), dhp);
      product(lhs.data(), true, x_pairs.data(), out.data());
      if (source_grads) {  // c's gradient through q and k, and their weight sums
        source_grads->through_q_k(dq.data(), out.data(), dhp, rq.slice(b, hh), rq.s2, b, hh, DH);
      } else {
        store_rows(rdk.slice(b, hh), rdk.s2);
      }
    }
    if (tiles) at::native::cpublas::brgemm_release(true);
  });
}
#endif

// ---- the whole forward and backward in fp32 (forward_fp32, backward_fp32 and their projected forms), every CPU ----
// As forward_whole_bf16 and backward_whole_bf16 (same passes, same order), with fp32 products: each slice's operands
// are copied into zero-padded per-thread buffers (rows a multiple of kTileRows, row lengths whole vectors), and every
// product is tiles of kTileRows x up to 2 vectors of fp32 multiply-adds held in registers (fma_tile) that skip what
// the causal mask zeroes: S = q k^T and G = dN v^T only up to the diagonal's vector, C v and dS k only over s <= t,
// C^T dN and dS^T q only over t >= s. PyTorch's batched products computed the whole T x T squares, through memory.

// 6 rows x 2 vectors: 12 accumulators, 2 loads and a broadcast in AVX2's 16 registers (a standalone loop of the
// S = q k^T shape on one core of an AVX2 EPYC, session 34: 75 GFLOP/s; 4 x 3, whose loads the compiler folded into
// the multiply-adds, 61; 4 x 2, 41)
constexpr int64_t kTileRows = 6;

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// out[r][v] = sum_{p0 <= p < p1} A(r, p) B[p][v] for r < kTileRows and the NV vectors v from b and out, where
// A(r, p) = a[r * a_r + p * a_p] (rows or columns of a buffer) and B's rows are b_p apart; out's rows out_r apart.
template <int NV>
inline void fma_tile(const float* a, int64_t a_r, int64_t a_p, const float* b, int64_t b_p, int64_t p0, int64_t p1,
                     float* out, int64_t out_r) {
  vfloat acc[kTileRows][NV] = {};
  for (int64_t p = p0; p < p1; ++p) {
    vfloat bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b + p * b_p + v * kLanes, kLanes);
    for (int r = 0; r < kTileRows; ++r) {
      const vfloat av = splat(a[r * a_r + p * a_p]);
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < kTileRows; ++r)
    for (int v = 0; v < NV; ++v) store(out + r * out_r + v * kLanes, acc[r][v], kLanes);
}

// Which p a row block from r0 sums over in fma_rows: all p < p_end, or the causal products' share: p <= r (C v,
// dS k: C and dS are 0 above the diagonal) or p >= r (C^T dN, dS^T q)
enum class Span { kAll, kUpToDiagonal, kFromDiagonal };

// out (rows x vectors * kLanes, rows out_r apart) = A B as fma_tile defines them, for rows a multiple of kTileRows:
// each block of kTileRows rows over its span of p, and (diagonal_columns) only the column vectors that reach the
// diagonal (S = q k^T and G = dN v^T, whose entries above it the causal mask zeroes; the columns of a vector past
// the diagonal are computed, the vectors wholly past it left as they are)
inline void fma_rows(const float* a, int64_t a_r, int64_t a_p, const float* b, int64_t b_p, int64_t rows, float* out,
                     int64_t out_r, Span span, int64_t p_end, int64_t vectors, bool diagonal_columns) {
  // pairs of column vectors outermost: their rows of B (b_p apart) stay in L1 while the blocks of rows of A pass
  // (the other order, B's whole row length re-read for every block of rows, ran at about 0.7x in that loop)
  for (int64_t v = 0; v < vectors; v += 2) {
    const int64_t nv = std::min<int64_t>(2, vectors - v);
    // with diagonal_columns, only the row blocks that reach column vector v: block j (rows j kTileRows ..
    // j kTileRows + kTileRows - 1) from j = ceil((v kLanes - kTileRows + 1) / kTileRows) on
    const int64_t first = diagonal_columns ? v * kLanes / kTileRows : 0;
    for (int64_t r0 = first * kTileRows; r0 < rows; r0 += kTileRows) {
      const int64_t p0 = span == Span::kFromDiagonal ? r0 : 0;
      const int64_t p1 = span == Span::kUpToDiagonal ? std::min(p_end, r0 + kTileRows) : p_end;
      // with diagonal_columns, the pair's second vector only for the row blocks that reach it: above the diagonal
      // the consumers (forward_row, backward_row) only zero those lanes, never reading them
      if (nv == 2 && (!diagonal_columns || r0 + kTileRows > (v + 1) * kLanes)) {
        fma_tile<2>(a + r0 * a_r, a_r, a_p, b + v * kLanes, b_p, p0, p1, out + r0 * out_r + v * kLanes, out_r);
      } else {
        fma_tile<1>(a + r0 * a_r, a_r, a_p, b + v * kLanes, b_p, p0, p1, out + r0 * out_r + v * kLanes, out_r);
      }
    }
  }
}

// rows x cols of x (rows x_ld apart) into out (rows out_ld apart), zeros past cols up to out_ld
inline void copy_rows(const float* x, int64_t x_ld, int64_t rows, int64_t cols, float* out, int64_t out_ld) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(out + r * out_ld, x + r * x_ld, cols * sizeof(float));
    std::fill(out + r * out_ld + cols, out + (r + 1) * out_ld, 0.0f);
  }
}

// One stage of a kLanes x kLanes transpose in registers: the off-diagonal D x D blocks of each 2D x 2D block swap
// places (lane l of rows i and i + D, i & D == 0: where l & D, row i takes row i + D's lane l - D, and row i + D
// gives row i its lane l + D). After the stages D = kLanes / 2, ..., 2, 1, row i holds column i.
template <int D, int... L>
inline void swap_blocks(vfloat& a, vfloat& b, std::integer_sequence<int, L...>) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  const vfloat low = __builtin_shufflevector(a, b, ((L & D) == 0 ? L : kLanes + L - D)...);
  b = __builtin_shufflevector(a, b, ((L & D) == 0 ? L + D : kLanes + L)...);
#else
  const vfloat low = __builtin_shuffle(a, b, vint{((L & D) == 0 ? L : kLanes + L - D)...});
  b = __builtin_shuffle(a, b, vint{((L & D) == 0 ? L + D : kLanes + L)...});
#endif
  a = low;
}
template <int D>
inline void transpose_stages(vfloat* r) {
  for (int i = 0; i < kLanes; ++i)
    if ((i & D) == 0) swap_blocks<D>(r[i], r[i + D], std::make_integer_sequence<int, kLanes>{});
  if constexpr (D > 1) transpose_stages<D / 2>(r);
}

// out[c][r] = x[r][c] for rows x cols of x (rows x_ld apart); out's rows out_ld apart (a multiple of kLanes, at least
// rows), zeros past `rows`: kLanes x kLanes blocks transposed in registers, rather than element by element with
// stores a row apart (the forward without that transpose of k ran a fifth faster, ViL-T's shape, session 34; the
// blocks' own gain was within the run-to-run spread of that measurement)
inline void transpose_rows(const float* x, int64_t x_ld, int64_t rows, int64_t cols, float* out, int64_t out_ld) {
  for (int64_t r0 = 0; r0 < out_ld; r0 += kLanes) {
    for (int64_t c0 = 0; c0 < cols; c0 += kLanes) {
      const int64_t nc = std::min(kLanes, cols - c0);
      vfloat block[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) {
        block[i] = r0 + i >= rows ? vfloat{} : nc == kLanes ? load(x + (r0 + i) * x_ld + c0, kLanes)
                                                            : load(x + (r0 + i) * x_ld + c0, nc);
      }
      transpose_stages<kLanes / 2>(block);
      for (int64_t j = 0; j < nc; ++j) store(out + (c0 + j) * out_ld + r0, block[j], kLanes);
    }
  }
}

void forward_whole_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* a,
                       const float* row_max, const float* m, float scale, float eps, float* weights, float* row_sum,
                       float* normaliser, const at::Tensor& h, const Projections* projections = nullptr,
                       const GatedOutput* gate = nullptr) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), DH = q.size(3);
  const int64_t Tr = round_up(T, kTileRows), Tc = round_up(T, kLanes), Dc = round_up(DH, kLanes);
  using Rows = SliceRows<float>;
  const Rows rq = slice_rows<float>(q), rk = slice_rows<float>(k), rv = slice_rows<float>(v),
             rh = slice_rows<float>(h);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qp(Tr * DH, 0.0f), kt(DH * Tc), vp(Tr * Dc, 0.0f), scores(Tr * Tc), c(Tr * Tc, 0.0f),
        num(Tr * Dc), kp(projections ? T * DH : 0), stats(gate ? 2 * T : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, hh = i % H;
      if (i + 1 < end) {  // the next slice's inputs, while this one computes (as forward_whole_bf16)
        const int64_t nb = (i + 1) / H, nh = (i + 1) % H;
        for (const Rows* x : {&rq, &rk, &rv}) {
          if (x != &rk || !projections) prefetch_rows(x->slice(nb, nh), x->s2, T, DH);  // (q's and k's source: c)
        }
        if (gate) gate->prefetch<float>(nb, nh * DH, DH);
      }
      if (projections) {  // q, k, v computed from their sources into the buffers the copies fill otherwise
        projections->slice(0, rq.slice(b, hh), rq.s2, hh * DH, T, DH, qp.data(), DH);
        projections->slice(1, rk.slice(b, hh), rk.s2, hh * DH, T, DH, kp.data(), DH);
        transpose_rows(kp.data(), DH, T, DH, kt.data(), Tc);
        projections->slice(2, rv.slice(b, hh), rv.s2, hh * DH, T, DH, vp.data(), Dc);
      } else {
        copy_rows(rq.slice(b, hh), rq.s2, T, DH, qp.data(), DH);
        transpose_rows(rk.slice(b, hh), rk.s2, T, DH, kt.data(), Tc);
        copy_rows(rv.slice(b, hh), rv.s2, T, DH, vp.data(), Dc);
      }
      // S = q k^T, the vectors of columns up to the diagonal
      fma_rows(qp.data(), DH, 1, kt.data(), Tc, Tr, scores.data(), Tc, Span::kAll, DH, Tc / kLanes, true);
      const float* a_i = a + i * T;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = i * T + t;
        float* c_row = c.data() + t * Tc;
        row_sum[r] = forward_row(scores.data() + t * Tc, a_i, row_max[r], scale, c_row, t, T);
        normaliser[r] = std::max(std::abs(row_sum[r]), std::exp(-m[r]));
        if (weights) std::memcpy(weights + r * T, c_row, T * sizeof(float));
      }
      // C v over s <= t
      fma_rows(c.data(), Tc, 1, vp.data(), Dc, Tr, num.data(), Dc, Span::kUpToDiagonal, T, Dc / kLanes, false);
      float* h_i = rh.slice(b, hh);
      for (int64_t t = 0; t < T; ++t) {
        // one division a row, then products: a vector division takes about as long as 16-32 multiplications
        const vfloat inverse = splat(1.0f / (normaliser[i * T + t] + eps));
        float* num_row = num.data() + t * Dc;
        float* out_row = gate ? num_row : h_i + t * rh.s2;  // with `gate`: h's row in place of the numerator's
        for_vectors(DH, [&](int64_t d0, auto count) {
          store(out_row + d0, load(num_row + d0, count) * inverse, count);
        });
      }
      if (gate) gate->rows(num.data(), Dc, b, T, hh * DH, DH, stats.data());
    }
  });
}

void backward_whole_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_h,
                        const at::Tensor& h, const float* weights, const float* a, const float* row_max,
                        const float* m, const float* row_sum, const float* normaliser, float scale, float eps,
                        const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v, float* grad_m,
                        float* row_sums, float* col_sums, const Projections* projections = nullptr,
                        SourceGrads* source_grads = nullptr) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), DH = q.size(3);
  const int64_t Tr = round_up(T, kTileRows), Tc = round_up(T, kLanes), Dc = round_up(DH, kLanes);
  const int64_t blocks = Tc / kLanes;
  using Rows = SliceRows<float>;
  const Rows rq = slice_rows<float>(q), rk = slice_rows<float>(k), rv = slice_rows<float>(v),
             rdh = slice_rows<float>(grad_h), rh = slice_rows<float>(h), rdq = slice_rows<float>(grad_q),
             rdk = slice_rows<float>(grad_k), rdv = slice_rows<float>(grad_v);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // rows past T stay 0 in every buffer an A operand is read from (dn, c, ds) or a B operand (xp)
    std::vector<float> dn(Tr * Dc, 0.0f), c(Tr * Tc, 0.0f), vt(DH * Tc), g(Tr * Tc), ds(Tr * Tc, 0.0f),
        xp(Tr * Dc, 0.0f), out(Tr * Dc), grad_row_sum(T), dq(source_grads ? Tr * Dc : 0);
    std::vector<vfloat> cols(blocks);
    // out's T x DH sums into a slice of a gradient
    auto store_rows = [&](float* dst, int64_t stride) {
      for (int64_t t = 0; t < T; ++t) std::memcpy(dst + t * stride, out.data() + t * Dc, DH * sizeof(float));
    };
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, hh = i % H;
      if (i + 1 < end) {  // the next slice's rows, while this one computes (as backward_whole_bf16)
        const int64_t nb = (i + 1) / H, nh = (i + 1) % H;
        for (const Rows* x : {&rq, &rk, &rv, &rdh, &rh}) {
          if (x != &rk || !projections) prefetch_rows(x->slice(nb, nh), x->s2, T, DH);  // (q's and k's source: c)
        }
      }
      const float* a_i = a + i * T;
      // dN and the normaliser's gradient, row by row (as backward_whole_bf16)
      const float* dh_i = rdh.slice(b, hh);
      const float* h_i = rh.slice(b, hh);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = i * T + t;
        const vfloat inverse = splat(1.0f / (normaliser[r] + eps));
        float* dn_row = dn.data() + t * Dc;
        vfloat dot{};
        for_vectors(DH, [&](int64_t d0, auto count) {
          const vfloat dnv = load(dh_i + t * rdh.s2 + d0, count) * inverse;
          store(dn_row + d0, dnv, count);
          dot += dnv * load(h_i + t * rh.s2 + d0, count);
        });
        normaliser_grads(-lane_sum(dot), row_sum[r], m[r], grad_row_sum[t], grad_m[r]);
      }
      // dV = C^T dN over t >= s
      copy_rows(weights + i * T * T, T, T, T, c.data(), Tc);
      fma_rows(c.data(), 1, Tc, dn.data(), Dc, Tr, out.data(), Dc, Span::kFromDiagonal, T, Dc / kLanes, false);
      if (source_grads) {  // x_m's gradient through v, and v's weight sums
        source_grads->through_v(out.data(), Dc, rv.slice(b, hh), rv.s2, b, hh, DH);
      } else {
        store_rows(rdv.slice(b, hh), rdv.s2);
      }
      // G = dN v^T, the vectors of columns up to the diagonal
      if (projections) {  // v from its source, through out (free again) into the transposed buffer
        projections->slice(2, rv.slice(b, hh), rv.s2, hh * DH, T, DH, out.data(), Dc);
        transpose_rows(out.data(), Dc, T, DH, vt.data(), Tc);
      } else {
        transpose_rows(rv.slice(b, hh), rv.s2, T, DH, vt.data(), Tc);
      }
      fma_rows(dn.data(), Dc, 1, vt.data(), Tc, Tr, g.data(), Tc, Span::kAll, DH, blocks, true);
      // dS = (G + grad_row_sum) D' and the sums of d log D = (G + grad_row_sum) C (backward_f32's row pass)
      std::fill(cols.begin(), cols.end(), vfloat{});
      for (int64_t t = 0; t < T; ++t) {
        row_sums[i * T + t] = backward_row(g.data() + t * Tc, grad_row_sum[t], c.data() + t * Tc, a_i,
                                           row_max[i * T + t], scale, ds.data() + t * Tc, cols.data(), t, T);
      }
      for (int64_t blk = 0; blk < blocks; ++blk) {
        store(col_sums + i * T + blk * kLanes, cols[blk], std::min(kLanes, T - blk * kLanes));
      }
      // dQ = dS k over s <= t
      if (projections) {
        projections->slice(1, rk.slice(b, hh), rk.s2, hh * DH, T, DH, xp.data(), Dc);
      } else {
        copy_rows(rk.slice(b, hh), rk.s2, T, DH, xp.data(), Dc);
      }
      // (with source_grads into a buffer of its own, kept for c's gradient with dK's)
      float* dq_rows = source_grads ? dq.data() : out.data();
      fma_rows(ds.data(), Tc, 1, xp.data(), Dc, Tr, dq_rows, Dc, Span::kUpToDiagonal, T, Dc / kLanes, false);
      if (!source_grads) store_rows(rdq.slice(b, hh), rdq.s2);
      // dK = dS^T q over t >= s
      if (projections) {
        projections->slice(0, rq.slice(b, hh), rq.s2, hh * DH, T, DH, xp.data(), Dc);
      } else {
        copy_rows(rq.slice(b, hh), rq.s2, T, DH, xp.data(), Dc);
      }
      fma_rows(ds.data(), 1, Tc, xp.data(), Dc, Tr, out.data(), Dc, Span::kFromDiagonal, T, Dc / kLanes, false);
      if (source_grads) {  // c's gradient through q and k, and their weight sums
        source_grads->through_q_k(dq.data(), out.data(), Dc, rq.slice(b, hh), rq.s2, b, hh, DH);
      } else {
        store_rows(rdk.slice(b, hh), rdk.s2);
      }
    }
  });
}

// q, k, v, h (B, H, T, DH) bf16 with unit last strides, DH even; a, row_max, m (B, H, T) fp32 contiguous; weights
// (B, H, T, T) bf16 contiguous or None. Writes h (and C into weights); returns (row_sum, normaliser) (B, H, T).
// Only where has_bf16_scores(); on AMX tiles where the CPU has them and `tiles`.
// (forward_bf16_projected passes its Projections and the sources' head views as q, k, v.)
std::tuple<at::Tensor, at::Tensor> forward_bf16_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& a, const at::Tensor& row_max,
                                                     const at::Tensor& m, double scale, double eps,
                                                     const std::optional<at::Tensor>& weights, at::Tensor h,
                                                     bool tiles, const Projections* projections,
                                                     const GatedOutput* gate = nullptr) {
  check_rows(q, q, "q");
  check_rows(k, q, "k");
  check_rows(v, q, "v");
  check_rows(h, q, "h");
  TORCH_CHECK(q.size(3) % 2 == 0, "the head dimension must be even, got ", q.size(3));
  const int64_t T = q.size(2), n = q.size(0) * q.size(1);
  check_slices(a, n, T, "a");
  check_slices(row_max, n, T, "row_max");
  check_slices(m, n, T, "m");
  TORCH_CHECK(a.scalar_type() == at::kFloat && row_max.scalar_type() == at::kFloat && m.scalar_type() == at::kFloat,
              "a, row_max and m must be float32");
  at::BFloat16* pw = nullptr;
  if (weights.has_value()) {
    check_slices(*weights, n, T * T, "weights");
    TORCH_CHECK(weights->scalar_type() == at::kBFloat16, "weights must be bfloat16");
    pw = weights->data_ptr<at::BFloat16>();
  }
  auto row_sum = at::empty({q.size(0), q.size(1), T}, a.options());
  auto normaliser = at::empty_like(row_sum);
#if defined(__AVX512BF16__)
  forward_whole_bf16(q, k, v, a.data_ptr<float>(), row_max.data_ptr<float>(), m.data_ptr<float>(),
                     static_cast<float>(scale), static_cast<float>(eps), pw, row_sum.data_ptr<float>(),
                     normaliser.data_ptr<float>(), h, tiles && can_use_tiles(), projections, gate);
#endif
  return {row_sum, normaliser};
}

std::tuple<at::Tensor, at::Tensor> forward_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& a, const at::Tensor& row_max, const at::Tensor& m,
                                                double scale, double eps, const std::optional<at::Tensor>& weights,
                                                at::Tensor h, bool tiles) {
  TORCH_CHECK(has_bf16_scores(), "forward_bf16 needs a CPU with AVX512-BF16 (see has_bf16_scores)");
  return forward_bf16_impl(q, k, v, a, row_max, m, scale, eps, weights, h, tiles, nullptr);
}

// q, k, v, grad_h, h and the outputs grad_q, grad_k, grad_v (B, H, T, DH) bf16 with unit last strides, DH even;
// weights (B, H, T, T) bf16 contiguous (the forward's C); a, row_max, m, row_sum, normaliser (B, H, T) fp32
// contiguous. Writes the three gradients; returns grad_m and the row and column sums of d log D, (B, H, T) fp32
// each. Only where has_bf16_scores(); on AMX tiles where the CPU has them and `tiles`.
// (backward_bf16_projected passes its Projections and the sources' head views as q, k, v.)
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_bf16_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_h, const at::Tensor& h,
    const at::Tensor& weights, const at::Tensor& a, const at::Tensor& row_max, const at::Tensor& m,
    const at::Tensor& row_sum, const at::Tensor& normaliser, double scale, double eps, const at::Tensor& grad_q,
    const at::Tensor& grad_k, const at::Tensor& grad_v, bool tiles, const Projections* projections,
    SourceGrads* source_grads = nullptr) {
  check_rows(q, q, "q");
  const std::pair<const at::Tensor*, const char*> rows[] = {{&k, "k"}, {&v, "v"}, {&grad_h, "grad_h"}, {&h, "h"},
                                                            {&grad_q, "grad_q"}, {&grad_k, "grad_k"},
                                                            {&grad_v, "grad_v"}};
  for (const auto& [x, what] : rows) check_rows(*x, q, what);
  TORCH_CHECK(q.size(3) % 2 == 0, "the head dimension must be even, got ", q.size(3));
  const int64_t T = q.size(2), n = q.size(0) * q.size(1);
  check_slices(weights, n, T * T, "weights");
  TORCH_CHECK(weights.scalar_type() == at::kBFloat16, "weights must be bfloat16");
  check_vectors({{&a, "a"}, {&row_max, "row_max"}, {&m, "m"}, {&row_sum, "row_sum"}, {&normaliser, "normaliser"}},
                n, T);
  auto grad_m = at::empty({q.size(0), q.size(1), T}, a.options());
  auto row_sums = at::empty_like(grad_m), col_sums = at::empty_like(grad_m);
#if defined(__AVX512BF16__)
  backward_whole_bf16(q, k, v, grad_h, h, weights.data_ptr<at::BFloat16>(), a.data_ptr<float>(),
                      row_max.data_ptr<float>(), m.data_ptr<float>(), row_sum.data_ptr<float>(),
                      normaliser.data_ptr<float>(), static_cast<float>(scale), static_cast<float>(eps), grad_q, grad_k,
                      grad_v, grad_m.data_ptr<float>(), row_sums.data_ptr<float>(), col_sums.data_ptr<float>(),
                      tiles && can_use_tiles(), projections, source_grads);
#endif
  return {grad_m, row_sums, col_sums};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_bf16(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_h, const at::Tensor& h,
    const at::Tensor& weights, const at::Tensor& a, const at::Tensor& row_max, const at::Tensor& m,
    const at::Tensor& row_sum, const at::Tensor& normaliser, double scale, double eps, at::Tensor grad_q,
    at::Tensor grad_k, at::Tensor grad_v, bool tiles) {
  TORCH_CHECK(has_bf16_scores(), "backward_bf16 needs a CPU with AVX512-BF16 (see has_bf16_scores)");
  return backward_bf16_impl(q, k, v, grad_h, h, weights, a, row_max, m, row_sum, normaliser, scale, eps, grad_q,
                            grad_k, grad_v, tiles, nullptr);
}

// forward_bf16's contract in fp32: q, k, v, h (B, H, T, DH) float32 with unit last strides (any DH); weights
// (B, H, T, T) float32 contiguous or None. Writes h (and C into weights); returns (row_sum, normaliser) (B, H, T).
// (forward_fp32_projected passes its Projections and the sources' head views as q, k, v.)
std::tuple<at::Tensor, at::Tensor> forward_fp32_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& a, const at::Tensor& row_max,
                                                     const at::Tensor& m, double scale, double eps,
                                                     const std::optional<at::Tensor>& weights, const at::Tensor& h,
                                                     const Projections* projections,
                                                     const GatedOutput* gate = nullptr) {
  check_rows(q, q, "q", at::kFloat);
  check_rows(k, q, "k", at::kFloat);
  check_rows(v, q, "v", at::kFloat);
  check_rows(h, q, "h", at::kFloat);
  const int64_t T = q.size(2), n = q.size(0) * q.size(1);
  check_vectors({{&a, "a"}, {&row_max, "row_max"}, {&m, "m"}}, n, T);
  float* pw = nullptr;
  if (weights.has_value()) {
    check_slices(*weights, n, T * T, "weights");
    TORCH_CHECK(weights->scalar_type() == at::kFloat, "weights must be float32");
    pw = weights->data_ptr<float>();
  }
  auto row_sum = at::empty({q.size(0), q.size(1), T}, a.options());
  auto normaliser = at::empty_like(row_sum);
  forward_whole_f32(q, k, v, a.data_ptr<float>(), row_max.data_ptr<float>(), m.data_ptr<float>(),
                    static_cast<float>(scale), static_cast<float>(eps), pw, row_sum.data_ptr<float>(),
                    normaliser.data_ptr<float>(), h, projections, gate);
  return {row_sum, normaliser};
}

std::tuple<at::Tensor, at::Tensor> forward_fp32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& a, const at::Tensor& row_max, const at::Tensor& m,
                                                double scale, double eps, const std::optional<at::Tensor>& weights,
                                                at::Tensor h) {
  return forward_fp32_impl(q, k, v, a, row_max, m, scale, eps, weights, h, nullptr);
}

// backward_bf16's contract in fp32: q, k, v, grad_h, h, grad_q, grad_k, grad_v (B, H, T, DH) float32 with unit last
// strides; weights (B, H, T, T) float32 contiguous (the forward's C). Writes the three gradients; returns grad_m and
// the row and column sums of d log D, (B, H, T) fp32 each.
// (backward_fp32_projected passes its Projections and the sources' head views as q, k, v.)
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_fp32_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_h, const at::Tensor& h,
    const at::Tensor& weights, const at::Tensor& a, const at::Tensor& row_max, const at::Tensor& m,
    const at::Tensor& row_sum, const at::Tensor& normaliser, double scale, double eps, const at::Tensor& grad_q,
    const at::Tensor& grad_k, const at::Tensor& grad_v, const Projections* projections,
    SourceGrads* source_grads = nullptr) {
  check_rows(q, q, "q", at::kFloat);
  for (const auto& [x, what] : {std::pair<const at::Tensor*, const char*>{&k, "k"}, {&v, "v"}, {&grad_h, "grad_h"},
                                {&h, "h"}, {&grad_q, "grad_q"}, {&grad_k, "grad_k"}, {&grad_v, "grad_v"}}) {
    if (!source_grads || (x != &grad_q && x != &grad_k && x != &grad_v)) check_rows(*x, q, what, at::kFloat);
  }
  const int64_t T = q.size(2), n = q.size(0) * q.size(1);
  check_slices(weights, n, T * T, "weights");
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "weights must be float32");
  check_vectors({{&a, "a"}, {&row_max, "row_max"}, {&m, "m"}, {&row_sum, "row_sum"}, {&normaliser, "normaliser"}},
                n, T);
  auto grad_m = at::empty({q.size(0), q.size(1), T}, a.options());
  auto row_sums = at::empty_like(grad_m), col_sums = at::empty_like(grad_m);
  backward_whole_f32(q, k, v, grad_h, h, weights.data_ptr<float>(), a.data_ptr<float>(), row_max.data_ptr<float>(),
                     m.data_ptr<float>(), row_sum.data_ptr<float>(), normaliser.data_ptr<float>(),
                     static_cast<float>(scale), static_cast<float>(eps), grad_q, grad_k, grad_v,
                     grad_m.data_ptr<float>(), row_sums.data_ptr<float>(), col_sums.data_ptr<float>(),
                     projections, source_grads);
  return {grad_m, row_sums, col_sums};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_fp32(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_h, const at::Tensor& h,
    const at::Tensor& weights, const at::Tensor& a, const at::Tensor& row_max, const at::Tensor& m,
    const at::Tensor& row_sum, const at::Tensor& normaliser, double scale, double eps, at::Tensor grad_q,
    at::Tensor grad_k, at::Tensor grad_v) {
  return backward_fp32_impl(q, k, v, grad_h, h, weights, a, row_max, m, row_sum, normaliser, scale, eps, grad_q,
                            grad_k, grad_v, nullptr);
}

// The projections' weights (block-diagonal, (C / bs, bs, bs), any floating dtype) as fp32 tables, and their
// biases ((C,) or None) in fp32, for sources c, x_m (B, T, C) contiguous in `dtype` (bf16 or fp32, the kernel's)
// with C = num_heads * DH.
Projections make_projections(const at::Tensor& c, const at::Tensor& x_m, int64_t num_heads, const at::Tensor& wq,
                             const std::optional<at::Tensor>& bq, const at::Tensor& wk,
                             const std::optional<at::Tensor>& bk, const at::Tensor& wv,
                             const std::optional<at::Tensor>& bv, at::ScalarType dtype = at::kBFloat16) {
  const char* name = dtype == at::kBFloat16 ? "bfloat16" : "float32";
  TORCH_CHECK(c.dim() == 3 && c.scalar_type() == dtype && c.is_contiguous(),
              "c must be a contiguous (B, T, C) ", name, " tensor, got ", c.sizes(), " ", c.scalar_type());
  TORCH_CHECK(x_m.sizes() == c.sizes() && x_m.scalar_type() == dtype && x_m.is_contiguous(),
              "x_m must be contiguous ", name, " with c's shape ", c.sizes(), ", got ", x_m.sizes(), " ",
              x_m.scalar_type());
  const int64_t C = c.size(2);
  TORCH_CHECK(num_heads > 0 && C % num_heads == 0, C, " channels do not split into ", num_heads, " heads");
  const int64_t DH = C / num_heads;
  Projections projections;
  projections.C = C;
  const at::Tensor* weights[3] = {&wq, &wk, &wv};
  const std::optional<at::Tensor>* biases[3] = {&bq, &bk, &bv};
  for (int p = 0; p < 3; ++p) {
    const int64_t bs = check_blocks(*weights[p], C, DH);
    TORCH_CHECK(p == 0 || bs == projections.bs, "all weights must have the same block size");
    projections.bs = bs;
    projections.tables[p] = weight_table(*weights[p]);
    if (biases[p]->has_value()) {
      const auto& bias = **biases[p];
      TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, "each bias must have shape (", C, "), got ", bias.sizes());
      const auto b32 = bias.to(at::kFloat).contiguous();
      projections.biases[p].assign(b32.data_ptr<float>(), b32.data_ptr<float>() + C);
    }
  }
  return projections;
}

// A (B, T, C) source as (B, H, T, DH) head views: the kernels read a slice's rows where they would read q's, k's or
// v's
at::Tensor source_heads(const at::Tensor& x, int64_t num_heads) {
  return x.view({x.size(0), x.size(1), num_heads, x.size(2) / num_heads}).transpose(1, 2);
}

// forward_bf16 with the cell's q, k and v computed from their sources slice by slice instead of read:
// q = Wq c + bq, k = Wk c + bk (from c), v = Wv x_m + bv (from x_m), W block-diagonal (C / bs, bs, bs) as
// block_diag_mm takes them (any floating dtype, used in fp32), biases (C,) or None. c, x_m (B, T, C) bf16
// contiguous with C = num_heads * DH, DH even; h (B, H, T, DH) bf16, unit last stride. q, k, v, which the
// projections would write out and the cell read back (six passes over (B, T, C) memory), stay in cache. C is
// written into `weights` when given (training; (B, H, T, T) bf16 contiguous). Returns (row_sum, normaliser) (B, H, T).
std::tuple<at::Tensor, at::Tensor> forward_bf16_projected(
    const at::Tensor& c, const at::Tensor& x_m, int64_t num_heads, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& a, const at::Tensor& row_max,
    const at::Tensor& m, double scale, double eps, at::Tensor h, bool tiles,
    const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(has_bf16_scores(), "forward_bf16_projected needs a CPU with AVX512-BF16 (see has_bf16_scores)");
  const Projections projections = make_projections(c, x_m, num_heads, wq, bq, wk, bk, wv, bv);
  return forward_bf16_impl(source_heads(c, num_heads), source_heads(c, num_heads), source_heads(x_m, num_heads), a,
                           row_max, m, scale, eps, weights, h, tiles, &projections);
}

// backward_bf16 for training with the cell's q, k and v computed slice by slice from their sources, as
// forward_bf16_projected computes them, instead of read (the layer's projections need not compute them again for
// backward and write them out). Arguments as forward_bf16_projected's and backward_bf16's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_bf16_projected(
    const at::Tensor& c, const at::Tensor& x_m, int64_t num_heads, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& grad_h, const at::Tensor& h,
    const at::Tensor& weights, const at::Tensor& a, const at::Tensor& row_max, const at::Tensor& m,
    const at::Tensor& row_sum, const at::Tensor& normaliser, double scale, double eps, at::Tensor grad_q,
    at::Tensor grad_k, at::Tensor grad_v, bool tiles) {
  TORCH_CHECK(has_bf16_scores(), "backward_bf16_projected needs a CPU with AVX512-BF16 (see has_bf16_scores)");
  const Projections projections = make_projections(c, x_m, num_heads, wq, bq, wk, bk, wv, bv);
  return backward_bf16_impl(source_heads(c, num_heads), source_heads(c, num_heads), source_heads(x_m, num_heads),
                            grad_h, h, weights, a, row_max, m, row_sum, normaliser, scale, eps, grad_q, grad_k,
                            grad_v, tiles, &projections);
}

// forward_bf16_projected's contract in fp32 (forward_fp32 with q, k, v computed from c and x_m slice by slice): c,
// x_m (B, T, C) float32 contiguous, any DH; h (B, H, T, DH) float32, unit last stride; `weights` as forward_fp32's.
// The sums are block_diag_mm's, so h and C are forward_fp32's bits from block_diag_mm's q, k, v.
std::tuple<at::Tensor, at::Tensor> forward_fp32_projected(
    const at::Tensor& c, const at::Tensor& x_m, int64_t num_heads, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& a, const at::Tensor& row_max,
    const at::Tensor& m, double scale, double eps, at::Tensor h, const std::optional<at::Tensor>& weights) {
  const Projections projections = make_projections(c, x_m, num_heads, wq, bq, wk, bk, wv, bv, at::kFloat);
  return forward_fp32_impl(source_heads(c, num_heads), source_heads(c, num_heads), source_heads(x_m, num_heads), a,
                           row_max, m, scale, eps, weights, h, &projections);
}

// The layer's output path for the gated inference ops below: checks z, y (c's shape and dtype, contiguous) and the
// norm's parameters (C,), and holds scale = 1 + norm_weight, the bias (zeros without one) and skip in fp32, as
// layer_cpu.cpp's gated_norm_forward takes them.
GatedOutput make_gate(const at::Tensor& c, const at::Tensor& z, const at::Tensor& norm_weight,
                      const std::optional<at::Tensor>& norm_bias, const at::Tensor& skip, double norm_eps,
                      const at::Tensor& y) {
  for (const auto& [x, what] : {std::pair{&z, "z"}, std::pair{&y, "y"}}) {
    TORCH_CHECK(x->sizes() == c.sizes() && x->scalar_type() == c.scalar_type() && x->is_contiguous(), what,
                " must be contiguous with c's shape ", c.sizes(), " and dtype ", c.scalar_type(), ", got ",
                x->sizes(), " ", x->scalar_type());
  }
  const int64_t C = c.size(2);
  auto channels = [&](const at::Tensor& p, const char* what) {
    TORCH_CHECK(p.dim() == 1 && p.size(0) == C, what, " must have shape (", C, "), got ", p.sizes());
    return p.to(at::kFloat).contiguous();
  };
  return GatedOutput(c, z, y, channels(norm_weight, "norm_weight") + 1.0f,
                     norm_bias ? channels(*norm_bias, "norm_bias") : at::zeros({C}, c.options().dtype(at::kFloat)),
                     channels(skip, "skip"), static_cast<float>(norm_eps));
}

// forward_bf16_projected for inference, ending with the layer's output path (GatedOutput): writes
// y = (HeadNorm(h) * (1 + norm_weight) + norm_bias + skip * c) * SiLU(z), layer_cpu.cpp's gated_norm_forward of the
// h that forward_bf16_projected gives, bit for bit, where that would write h and gated_norm read it back. z, y (B, T,
// C) bf16 contiguous as c; norm_weight, skip (C,), norm_bias (C,) or None, any floating dtype (used in fp32).
// Returns (row_sum, normaliser) (B, H, T).
std::tuple<at::Tensor, at::Tensor> forward_bf16_projected_gated(
    const at::Tensor& c, const at::Tensor& x_m, int64_t num_heads, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& a, const at::Tensor& row_max,
    const at::Tensor& m, double scale, double eps, const at::Tensor& z, const at::Tensor& norm_weight,
    const std::optional<at::Tensor>& norm_bias, const at::Tensor& skip, double norm_eps, at::Tensor y, bool tiles) {
  TORCH_CHECK(has_bf16_scores(), "forward_bf16_projected_gated needs a CPU with AVX512-BF16 (see has_bf16_scores)");
  const Projections projections = make_projections(c, x_m, num_heads, wq, bq, wk, bk, wv, bv);
  const GatedOutput gate = make_gate(c, z, norm_weight, norm_bias, skip, norm_eps, y);
  // (y's head views stand where h's would: the kernel writes y's rows instead)
  return forward_bf16_impl(source_heads(c, num_heads), source_heads(c, num_heads), source_heads(x_m, num_heads), a,
                           row_max, m, scale, eps, std::nullopt, source_heads(y, num_heads), tiles, &projections,
                           &gate);
}

// forward_bf16_projected_gated in fp32: forward_fp32_projected ending with the output path, gated_norm_forward's
// bits of its h. c, x_m, z, y (B, T, C) float32 contiguous.
std::tuple<at::Tensor, at::Tensor> forward_fp32_projected_gated(
    const at::Tensor& c, const at::Tensor& x_m, int64_t num_heads, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& a, const at::Tensor& row_max,
    const at::Tensor& m, double scale, double eps, const at::Tensor& z, const at::Tensor& norm_weight,
    const std::optional<at::Tensor>& norm_bias, const at::Tensor& skip, double norm_eps, at::Tensor y) {
  const Projections projections = make_projections(c, x_m, num_heads, wq, bq, wk, bk, wv, bv, at::kFloat);
  const GatedOutput gate = make_gate(c, z, norm_weight, norm_bias, skip, norm_eps, y);
  return forward_fp32_impl(source_heads(c, num_heads), source_heads(c, num_heads), source_heads(x_m, num_heads), a,
                           row_max, m, scale, eps, std::nullopt, source_heads(y, num_heads), &projections, &gate);
}

// backward_bf16_projected's contract in fp32: backward_fp32 with q, k, v computed from c and x_m slice by slice, as
// forward_fp32_projected computes them (the same bits as backward_fp32 from block_diag_mm's q, k, v).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_fp32_projected(
    const at::Tensor& c, const at::Tensor& x_m, int64_t num_heads, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& grad_h, const at::Tensor& h,
    const at::Tensor& weights, const at::Tensor& a, const at::Tensor& row_max, const at::Tensor& m,
    const at::Tensor& row_sum, const at::Tensor& normaliser, double scale, double eps, at::Tensor grad_q,
    at::Tensor grad_k, at::Tensor grad_v) {
  const Projections projections = make_projections(c, x_m, num_heads, wq, bq, wk, bk, wv, bv, at::kFloat);
  return backward_fp32_impl(source_heads(c, num_heads), source_heads(c, num_heads), source_heads(x_m, num_heads),
                            grad_h, h, weights, a, row_max, m, row_sum, normaliser, scale, eps, grad_q, grad_k,
                            grad_v, &projections);
}

// The projections' backward for backward_*_projected_sources: checks grad_c, grad_x_m ((B, T, C) contiguous in
// c's dtype), runs `backward` (the cell's whole backward with the SourceGrads it is given; returns its three sums)
// and returns those sums, then the weights' gradients (C / bs, bs, bs) and the biases' (C,) for q, k and v, fp32.
template <typename Backward>
std::vector<at::Tensor> with_source_grads(const at::Tensor& c, const Projections& projections, const at::Tensor& wq,
                                          const at::Tensor& wk, const at::Tensor& wv, at::Tensor& grad_c,
                                          at::Tensor& grad_x_m, Backward backward) {
  const char* name = c.scalar_type() == at::kBFloat16 ? "bfloat16" : "float32";
  for (const auto& [x, what] : {std::pair{&grad_c, "grad_c"}, std::pair{&grad_x_m, "grad_x_m"}}) {
    TORCH_CHECK(x->sizes() == c.sizes() && x->scalar_type() == c.scalar_type() && x->is_contiguous(), what,
                " must be a contiguous ", name, " tensor of c's shape ", c.sizes(), ", got ", x->sizes(), " ",
                x->scalar_type());
  }
  const int64_t C = c.size(2), bs = projections.bs;
  SourceGrads sources{grad_c.data_ptr(), grad_x_m.data_ptr(), c.size(1), C, bs, at::get_num_threads()};
  const at::Tensor* ws[3] = {&wq, &wk, &wv};
  for (int p = 0; p < 3; ++p) sources.tables_t[p] = weight_table(ws[p]->transpose(1, 2));
  sources.partial.assign(sources.threads * 3 * (bs + 1) * C, 0.0f);
  auto [grad_m, row_sums, col_sums] = backward(&sources);
  std::vector<float> table(3 * (bs + 1) * C);
  sum_partials(sources.partial, sources.threads, 3 * (bs + 1) * C, table.data());
  std::vector<at::Tensor> out{grad_m, row_sums, col_sums};
  const auto options = c.options().dtype(at::kFloat);
  for (int p = 0; p < 3; ++p) {
    const float* t = table.data() + p * (bs + 1) * C;
    out.push_back(weight_from_table(t, C, bs, options));
    out.push_back(at::from_blob(const_cast<float*>(t + bs * C), {C}, options).clone());
  }
  return out;
}

// backward_fp32_projected that also takes the projections' backward (SourceGrads): instead of q's, k's and v's
// gradients it writes c's gradient through q and k, grad_c = Wq^T dq + Wk^T dk, and x_m's through v,
// grad_x_m = Wv^T dv ((B, T, C) float32 contiguous, every element written), and returns, after backward_fp32's
// three sums, the weights' gradients (C / bs, bs, bs) and the biases' (C,) for q, k and v, fp32 (the biases'
// whether the projections have biases or not). The same sums as block_diag_mm and block_diag_outer make from
// backward_fp32_projected's gradients, in another order.
std::vector<at::Tensor> backward_fp32_projected_sources(
    const at::Tensor& c, const at::Tensor& x_m, int64_t num_heads, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& grad_h, const at::Tensor& h,
    const at::Tensor& weights, const at::Tensor& a, const at::Tensor& row_max, const at::Tensor& m,
    const at::Tensor& row_sum, const at::Tensor& normaliser, double scale, double eps, at::Tensor grad_c,
    at::Tensor grad_x_m) {
  const Projections projections = make_projections(c, x_m, num_heads, wq, bq, wk, bk, wv, bv, at::kFloat);
  const auto heads_c = source_heads(c, num_heads);
  return with_source_grads(c, projections, wq, wk, wv, grad_c, grad_x_m, [&](SourceGrads* sources) {
    return backward_fp32_impl(heads_c, heads_c, source_heads(x_m, num_heads), grad_h, h, weights, a, row_max, m,
                              row_sum, normaliser, scale, eps, heads_c, heads_c, heads_c, &projections, sources);
  });
}

// backward_fp32_projected_sources under bf16 (backward_bf16_projected that also takes the projections' backward):
// c, x_m, grad_c, grad_x_m (B, T, C) bfloat16 contiguous; c's and x_m's gradients are summed in fp32 from the
// slice's fp32 dQ, dK, dV and rounded once, where the previous route rounded dq, dk, dv to bf16 first; the
// weights' and biases' gradients are fp32 sums. Only where has_bf16_scores(); on AMX tiles where the CPU has them
// and `tiles`.
std::vector<at::Tensor> backward_bf16_projected_sources(
    const at::Tensor& c, const at::Tensor& x_m, int64_t num_heads, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const at::Tensor& grad_h, const at::Tensor& h,
    const at::Tensor& weights, const at::Tensor& a, const at::Tensor& row_max, const at::Tensor& m,
    const at::Tensor& row_sum, const at::Tensor& normaliser, double scale, double eps, at::Tensor grad_c,
    at::Tensor grad_x_m, bool tiles) {
  TORCH_CHECK(has_bf16_scores(),
              "backward_bf16_projected_sources needs a CPU with AVX512-BF16 (see has_bf16_scores)");
  const Projections projections = make_projections(c, x_m, num_heads, wq, bq, wk, bk, wv, bv);
  const auto heads_c = source_heads(c, num_heads);
  return with_source_grads(c, projections, wq, wk, wv, grad_c, grad_x_m, [&](SourceGrads* sources) {
    return backward_bf16_impl(heads_c, heads_c, source_heads(x_m, num_heads), grad_h, h, weights, a, row_max, m,
                              row_sum, normaliser, scale, eps, heads_c, heads_c, heads_c, tiles, &projections,
                              sources);
  });
}

// q, k (B, H, T, DH) bf16, unit last stride, DH even; a, row_max (B, H, T) fp32 contiguous; weights (B, H, T, T)
// bf16 contiguous. Returns row_sum (B, H, T) fp32. Only where has_bf16_scores().
at::Tensor weights_forward_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& a,
                              const at::Tensor& row_max, double scale, at::Tensor weights, bool tiles) {
  TORCH_CHECK(has_bf16_scores(), "weights_forward_qk needs a CPU with AVX512-BF16 (see has_bf16_scores)");
  check_rows(q, q, "q");
  check_rows(k, q, "k");
  TORCH_CHECK(q.size(3) % 2 == 0, "the head dimension must be even, got ", q.size(3));
  const int64_t T = q.size(2), n = q.size(0) * q.size(1);
  check_slices(weights, n, T * T, "weights");
  check_slices(a, n, T, "a");
  check_slices(row_max, n, T, "row_max");
  TORCH_CHECK(weights.scalar_type() == at::kBFloat16, "weights must be bfloat16");
  TORCH_CHECK(a.scalar_type() == at::kFloat && row_max.scalar_type() == at::kFloat, "a and row_max must be float32");
  auto row_sum = at::empty(a.sizes(), a.options());
#if defined(__AVX512BF16__)
  forward_qk_bf16(q, k, a.data_ptr<float>(), row_max.data_ptr<float>(), static_cast<float>(scale),
                  weights.data_ptr<at::BFloat16>(), row_sum.data_ptr<float>(), tiles && can_use_tiles());
#endif
  return row_sum;
}

}  // namespace

TORCH_LIBRARY(vision_lstm_cpu, m) {
  m.def("weights_forward(Tensor scores, Tensor a, Tensor row_max, float scale, Tensor(a!) weights) -> Tensor");
  m.def("weights_backward(Tensor grad_c, Tensor grad_row_sum, Tensor weights, Tensor a, Tensor row_max, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("divide_rows(Tensor num, Tensor denom, Tensor(a!) out) -> ()");
  m.def("divide_rows_dot(Tensor num, Tensor denom, Tensor(a!) out, Tensor h) -> Tensor");
  m.def("weights_forward_qk(Tensor q, Tensor k, Tensor a, Tensor row_max, float scale, Tensor(a!) weights, "
        "bool tiles=True) -> Tensor");
  m.def("forward_bf16(Tensor q, Tensor k, Tensor v, Tensor a, Tensor row_max, Tensor m, float scale, float eps, "
        "Tensor(a!)? weights, Tensor(b!) h, bool tiles=True) -> (Tensor, Tensor)");
  m.def("forward_bf16_projected(Tensor c, Tensor x_m, int num_heads, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, "
        "Tensor wv, Tensor? bv, Tensor a, Tensor row_max, Tensor m, float scale, float eps, Tensor(a!) h, "
        "bool tiles=True, Tensor(b!)? weights=None) -> (Tensor, Tensor)");
  m.def("backward_bf16_projected(Tensor c, Tensor x_m, int num_heads, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, "
        "Tensor wv, Tensor? bv, Tensor grad_h, Tensor h, Tensor weights, Tensor a, Tensor row_max, Tensor m, "
        "Tensor row_sum, Tensor normaliser, float scale, float eps, Tensor(a!) grad_q, Tensor(b!) grad_k, "
        "Tensor(c!) grad_v, bool tiles=True) -> (Tensor, Tensor, Tensor)");
  m.def("backward_bf16(Tensor q, Tensor k, Tensor v, Tensor grad_h, Tensor h, Tensor weights, Tensor a, "
        "Tensor row_max, Tensor m, Tensor row_sum, Tensor normaliser, float scale, float eps, Tensor(a!) grad_q, "
        "Tensor(b!) grad_k, Tensor(c!) grad_v, bool tiles=True) -> (Tensor, Tensor, Tensor)");
  m.def("forward_fp32(Tensor q, Tensor k, Tensor v, Tensor a, Tensor row_max, Tensor m, float scale, float eps, "
        "Tensor(a!)? weights, Tensor(b!) h) -> (Tensor, Tensor)");
  m.def("backward_fp32(Tensor q, Tensor k, Tensor v, Tensor grad_h, Tensor h, Tensor weights, Tensor a, "
        "Tensor row_max, Tensor m, Tensor row_sum, Tensor normaliser, float scale, float eps, Tensor(a!) grad_q, "
        "Tensor(b!) grad_k, Tensor(c!) grad_v) -> (Tensor, Tensor, Tensor)");
  m.def("forward_fp32_projected(Tensor c, Tensor x_m, int num_heads, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, "
        "Tensor wv, Tensor? bv, Tensor a, Tensor row_max, Tensor m, float scale, float eps, Tensor(a!) h, "
        "Tensor(b!)? weights=None) -> (Tensor, Tensor)");
  m.def("backward_fp32_projected(Tensor c, Tensor x_m, int num_heads, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, "
        "Tensor wv, Tensor? bv, Tensor grad_h, Tensor h, Tensor weights, Tensor a, Tensor row_max, Tensor m, "
        "Tensor row_sum, Tensor normaliser, float scale, float eps, Tensor(a!) grad_q, Tensor(b!) grad_k, "
        "Tensor(c!) grad_v) -> (Tensor, Tensor, Tensor)");
  m.def("backward_fp32_projected_sources(Tensor c, Tensor x_m, int num_heads, Tensor wq, Tensor? bq, Tensor wk, "
        "Tensor? bk, Tensor wv, Tensor? bv, Tensor grad_h, Tensor h, Tensor weights, Tensor a, Tensor row_max, "
        "Tensor m, Tensor row_sum, Tensor normaliser, float scale, float eps, Tensor(a!) grad_c, "
        "Tensor(b!) grad_x_m) -> Tensor[]");
  m.def("backward_bf16_projected_sources(Tensor c, Tensor x_m, int num_heads, Tensor wq, Tensor? bq, Tensor wk, "
        "Tensor? bk, Tensor wv, Tensor? bv, Tensor grad_h, Tensor h, Tensor weights, Tensor a, Tensor row_max, "
        "Tensor m, Tensor row_sum, Tensor normaliser, float scale, float eps, Tensor(a!) grad_c, "
        "Tensor(b!) grad_x_m, bool tiles=True) -> Tensor[]");
  m.def("forward_bf16_projected_gated(Tensor c, Tensor x_m, int num_heads, Tensor wq, Tensor? bq, Tensor wk, "
        "Tensor? bk, Tensor wv, Tensor? bv, Tensor a, Tensor row_max, Tensor m, float scale, float eps, Tensor z, "
        "Tensor norm_weight, Tensor? norm_bias, Tensor skip, float norm_eps, Tensor(a!) y, bool tiles=True) "
        "-> (Tensor, Tensor)");
  m.def("forward_fp32_projected_gated(Tensor c, Tensor x_m, int num_heads, Tensor wq, Tensor? bq, Tensor wk, "
        "Tensor? bk, Tensor wv, Tensor? bv, Tensor a, Tensor row_max, Tensor m, float scale, float eps, Tensor z, "
        "Tensor norm_weight, Tensor? norm_bias, Tensor skip, float norm_eps, Tensor(a!) y) -> (Tensor, Tensor)");
  m.def("has_bf16_scores() -> bool", &has_bf16_scores);  // no tensor arguments: one kernel for every backend
  m.def("has_tile_scores() -> bool", &has_tile_scores);
  m.def("vector_lanes() -> int", &vector_lanes);
}

TORCH_LIBRARY_IMPL(vision_lstm_cpu, CPU, m) {
  m.impl("weights_forward", &weights_forward);
  m.impl("weights_backward", &weights_backward);
  m.impl("divide_rows", &divide_rows);
  m.impl("divide_rows_dot", &divide_rows_dot);
  m.impl("weights_forward_qk", &weights_forward_qk);
  m.impl("forward_bf16", &forward_bf16);
  m.impl("forward_bf16_projected", &forward_bf16_projected);
  m.impl("backward_bf16", &backward_bf16);
  m.impl("backward_bf16_projected", &backward_bf16_projected);
  m.impl("forward_fp32", &forward_fp32);
  m.impl("backward_fp32", &backward_fp32);
  m.impl("forward_fp32_projected", &forward_fp32_projected);
  m.impl("backward_fp32_projected", &backward_fp32_projected);
  m.impl("backward_fp32_projected_sources", &backward_fp32_projected_sources);
  m.impl("backward_bf16_projected_sources", &backward_bf16_projected_sources);
  m.impl("forward_bf16_projected_gated", &forward_bf16_projected_gated);
  m.impl("forward_fp32_projected_gated", &forward_fp32_projected_gated);
}

// Fused elementwise passes of the parallel mLSTM cell on the CPU (xLSTM paper, Beck et al. 2024, eqs. 59-64).
//
// The cell's matrix products stay in PyTorch (batched GEMMs). Between them, the PyTorch form makes about ten
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
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr float kLogDecayFloor = -60.0f;  // as cell._LOG_DECAY_FLOOR: exp() of less is below rounding, and slow

// ---- float32 (and bf16 storage): explicit 16-lane vectors (GCC/Clang vector extensions; the compiler splits them
// where the CPU has narrower registers). The compiler's own vectoriser left these loops scalar (measured). ----
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
typedef uint32_t vuint __attribute__((vector_size(64)));
typedef uint16_t vbf16 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;

inline vfloat splat(float x) { return vfloat{} + x; }

// exp(x) for x in [-60, 0] (what the decay needs): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// Taylor polynomial for exp(r) (error below 2e-7 relative over that range), and 2^n from the exponent bits
// (n >= -87: always a normal float). n is rounded by adding and subtracting 1.5 * 2^23.
inline vfloat exp_decay(vfloat x) {
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
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  return p * reinterpret_cast<const vfloat&>(bits);
}

// D'[t, s] for lanes s0 .. s0 + 15 of row t (0 above the diagonal)
inline vfloat decay_lanes(vfloat a, float row_max, float scale, int64_t s0, int64_t t) {
  const vint lane = vint{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} + static_cast<int32_t>(s0);
  vfloat x = a - row_max;
  x = x < kLogDecayFloor ? splat(kLogDecayFloor) : x;
  const vfloat d = exp_decay(x) * scale;
  return lane <= static_cast<int32_t>(t) ? d : vfloat{};
}

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

// Forward: C = S * D' (the weights of eq. 62), written in C's dtype (fp32, possibly in place of S, or bf16), and
// row_sum = sum_s C[t, s] in fp32, from the fp32 scores S = q k^T. Blocks of lanes wholly above the diagonal
// are only zeroed.
template <typename out_t>
void forward_f32(const float* scores, const float* a, const float* row_max, float scale, out_t* weights,
                 float* row_sum, int64_t n, int64_t T) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* a_i = a + i * T;
      for (int64_t t = 0; t < T; ++t) {
        const float* s_row = scores + (i * T + t) * T;
        out_t* c_row = weights + (i * T + t) * T;
        const float m = row_max[i * T + t];
        vfloat sum{};
        for (int64_t s0 = 0; s0 < T; s0 += kLanes) {
          const int64_t count = std::min(kLanes, T - s0);
          vfloat c{};
          if (s0 <= t) {
            c = load(s_row + s0, count) * decay_lanes(load(a_i + s0, count), m, scale, s0, t);
            sum += c;
          }
          store(c_row + s0, c, count);
        }
        row_sum[i * T + t] = lane_sum(sum);
      }
    }
  });
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
        const float m = row_max[i * T + t];
        const float g = grad_row_sum[i * T + t];
        vfloat sum{};
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t s0 = b * kLanes, count = std::min(kLanes, T - s0);
          vfloat ds{};
          if (s0 <= t) {
            const vfloat dc = load(grad_c + row + s0, count) + g;
            ds = dc * decay_lanes(load(a_i + s0, count), m, scale, s0, t);
            const vfloat dlog = dc * load(weights + row + s0, count);  // C is 0 above the diagonal
            sum += dlog;
            cols[b] += dlog;
          }
          store(grad_scores + row + s0, ds, count);
        }
        row_sums[i * T + t] = lane_sum(sum);
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
  const int64_t rows = num.size(0) * H * T;
  const auto* pn = num.data_ptr<at::BFloat16>();
  auto* po = out.data_ptr<at::BFloat16>();
  const auto* ph = h ? h->data_ptr<at::BFloat16>() : nullptr;
  const float* pd = denom.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * T), hh = (r / T) % H, t = r % T;
      const at::BFloat16* n_row = pn + b * num.stride(0) + hh * num.stride(1) + t * num.stride(2);
      at::BFloat16* o_row = po + b * out.stride(0) + hh * out.stride(1) + t * out.stride(2);
      const vfloat d = splat(pd[r]);
      vfloat sum{};
      for (int64_t s0 = 0; s0 < DH; s0 += kLanes) {
        const int64_t count = std::min(kLanes, DH - s0);
        const vfloat q = load(n_row + s0, count) / d;
        store(o_row + s0, q, count);
        if (ph) {
          const at::BFloat16* h_row = ph + b * h->stride(0) + hh * h->stride(1) + t * h->stride(2);
          sum += load(o_row + s0, count) * load(h_row + s0, count);
        }
      }
      if (dot) dot[r] = lane_sum(sum);
    }
  });
}

void check_rows(const at::Tensor& x, const at::Tensor& like, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, what, " must be a bfloat16 CPU tensor");
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

}  // namespace

TORCH_LIBRARY(vision_lstm_cpu, m) {
  m.def("weights_forward(Tensor scores, Tensor a, Tensor row_max, float scale, Tensor(a!) weights) -> Tensor");
  m.def("weights_backward(Tensor grad_c, Tensor grad_row_sum, Tensor weights, Tensor a, Tensor row_max, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("divide_rows(Tensor num, Tensor denom, Tensor(a!) out) -> ()");
  m.def("divide_rows_dot(Tensor num, Tensor denom, Tensor(a!) out, Tensor h) -> Tensor");
}

TORCH_LIBRARY_IMPL(vision_lstm_cpu, CPU, m) {
  m.impl("weights_forward", &weights_forward);
  m.impl("weights_backward", &weights_backward);
  m.impl("divide_rows", &divide_rows);
  m.impl("divide_rows_dot", &divide_rows_dot);
}

// The elementwise stages of the ViL block around the matrix products and the cell, each one pass over memory
// forward and one backward:
//
//   conv_silu:    c = SiLU(depthwise k x k conv of x_m on the token grid + bias)     (the q/k branch's input)
//   gated_norm:   y = (HeadNorm(h) * (1 + w) + b + skip * c) * SiLU(z)               (the layer's output path)
//   token_norm:   the block's input norm, LayerNorm(x) * (1 + w) + b, written in the layer's dtype and token order
//   add_reversed: the reversed block's residual sum x + flip(y)
//
// PyTorch runs these as separate passes: a oneDNN depthwise convolution and SiLU (and in backward SiLU's gradient
// and the convolution's two gradient kernels); a layer norm, two multiply-adds, SiLU and a product (backward about
// fifteen passes: the recomputed norm, the gate's gradient, three products and column sums for the parameters, the
// norm's gradient); a layer norm, a flip and a cast; a flip and an add. Each pass reads and writes a whole (B, T, C)
// tensor, and these stages are memory-bound. Here everything between loading the inputs and storing the outputs
// runs in fp32 registers: one rounding per output (bf16 or fp32), the norms' statistics and the parameter gradients
// summed in fp32.
//
// Compiled with mlstm_cpu.cpp and blockdiag_cpu.cpp by vision_lstm/fused.py; the layer and the block keep their
// PyTorch routes without it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "vec.h"
#include "headnorm.h"

namespace {

// A (B, T, C) view with a unit last stride: row (b, t) starts at data + b * sb + t * st.
template <typename T>
struct Tokens {
  T* data;
  int64_t sb, st;
  T* at(int64_t b, int64_t t) const { return data + b * sb + t * st; }
};

template <typename T>
Tokens<T> tokens_of(const at::Tensor& x) {
  return {static_cast<T*>(x.data_ptr()), x.stride(0), x.stride(1)};
}

void check_float_cpu(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              what, " must be a float32 or bfloat16 CPU tensor, got ", x.scalar_type(), " on ", x.device());
}

// A contiguous float32 or bfloat16 (B, T, D) CPU tensor
void check_rows(const at::Tensor& x, const char* what) {
  check_float_cpu(x, what);
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), what, " must be a contiguous (B, T, D) tensor, got ", x.sizes());
}

// A float32 or bfloat16 CPU view of the given shape and dtype with a unit last stride
void check_tokens(const at::Tensor& x, at::IntArrayRef shape, at::ScalarType dtype, const char* what) {
  check_float_cpu(x, what);
  TORCH_CHECK(x.scalar_type() == dtype, what, " must have the dtype ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.sizes() == shape, what, " must have the shape ", shape, ", got ", x.sizes());
  TORCH_CHECK(x.stride(-1) == 1, what, " must have a unit last stride");
}

// A per-channel parameter (C,) as fp32 (zeros for None)
at::Tensor channel_param(const std::optional<at::Tensor>& p, int64_t C, const char* what) {
  if (!p) return at::zeros({C}, at::kFloat);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == C, what, " must have shape (", C, "), got ", p->sizes());
  return p->to(at::kFloat).contiguous();
}

// Calls fn(T{}) with T the storage type (float or at::BFloat16) of dtype.
template <typename Fn>
void with_dtype(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kFloat)
    fn(float{});
  else
    fn(at::BFloat16{});
}

// ---------------------------------------------------------------------------------------------------------------
// gated_norm

// A layer norm's input gradient over n values: rstd (g - mean(g) - normed mean(g normed)) from the normalised
// values, the gradient g for them, and the lane sums of g and g normed
template <typename T>
inline void norm_input_grad(const float* normed_row, const float* grad_normed, vfloat sum_g, vfloat sum_gn, float rstd,
                            int64_t n, T* out, const T* plus = nullptr) {
  const float mean_g = lane_sum(sum_g) / n, mean_gn = lane_sum(sum_gn) / n;
  for_vectors(n, [&](int64_t i, auto count) {
    const vfloat g = load(grad_normed + i, count), normed = load(normed_row + i, count);
    const vfloat grad = (g - mean_g - normed * mean_gn) * rstd;
    store(out + i, plus ? grad + load(plus + i, count) : grad, count);
  });
}

// y = (norm(h) * scale + bias + skip * c) * SiLU(z + z_bias) for (B, T, H, DH) h and (B, T, C) c, z, y;
// scale = 1 + w; z_bias (C,) or null (none); mean and rstd (B * T * H,) are written for backward.
template <typename T>
void gated_norm_fwd(Tokens<const T> h, Tokens<const T> c, Tokens<const T> z, const float* scale, const float* bias,
                    const float* skip, const float* z_bias, float eps, Tokens<T> y, float* mean, float* rstd,
                    int64_t B, int64_t Tn, int64_t H, int64_t DH) {
  at::parallel_for(0, B * Tn, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Tn, t = r % Tn;
      const T *ph = h.at(b, t), *pc = c.at(b, t), *pz = z.at(b, t);
      T* py = y.at(b, t);
      // the row's statistics first: each head's is a chain of dependent steps (sums, divisions, a square root),
      // and the chains of different heads overlap when nothing else sits between them
      for (int64_t head = 0; head < H; ++head)
        head_stats(ph + head * DH, DH, eps, mean[r * H + head], rstd[r * H + head]);
      for (int64_t head = 0; head < H; ++head) {
        const int64_t off = head * DH;
        gated_head_out(ph + off, pc + off, pz + off, scale + off, bias + off, skip + off, mean[r * H + head],
                       rstd[r * H + head], DH, py + off, z_bias ? z_bias + off : nullptr);
      }
    }
  });
}

// The gradients of gated_norm_fwd for grad_y: grad_h, grad_c, grad_z (in the inputs' dtype) and the per-channel
// sums for w, b, skip and z_bias (fp32, 4 rows of C in `sums`; the last is grad_z's column sums, computed whether
// or not z_bias is given). Each thread sums its contiguous range of rows into its own partial rows.
template <typename T>
void gated_norm_bwd(Tokens<const T> gy, Tokens<const T> h, Tokens<const T> c, Tokens<const T> z, const float* scale,
                    const float* bias, const float* skip, const float* z_bias, const float* mean, const float* rstd,
                    Tokens<T> gh, Tokens<T> gc, Tokens<T> gz, float* sums, int64_t B, int64_t Tn, int64_t H,
                    int64_t DH) {
  const int64_t C = H * DH, N = B * Tn, threads = at::get_num_threads();
  std::vector<float> partial(threads * 4 * C, 0.0f);
  at::parallel_for(0, N, (N + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    float* gw = partial.data() + at::get_thread_num() * 4 * C;
    float *gb = gw + C, *gs = gw + 2 * C, *gzb = gw + 3 * C;
    std::vector<float> buffer(2 * DH);
    float *normed_row = buffer.data(), *grad_normed = buffer.data() + DH;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Tn, t = r % Tn;
      const T *pgy = gy.at(b, t), *ph = h.at(b, t), *pc = c.at(b, t), *pz = z.at(b, t);
      T *pgh = gh.at(b, t), *pgc = gc.at(b, t), *pgz = gz.at(b, t);
      for (int64_t head = 0; head < H; ++head) {
        const int64_t off = head * DH;
        const float mu = mean[r * H + head], rs = rstd[r * H + head];
        vfloat sum_g{}, sum_gn{};  // sums over the head of d(loss)/d(normed) and of it times normed
        for_vectors(DH, [&](int64_t d0, auto count) {
          const int64_t i = off + d0;
          const vfloat normed = (load(ph + i, count) - mu) * rs;
          const vfloat sc = load(scale + i, count), sk = load(skip + i, count), cv = load(pc + i, count);
          const vfloat pre = normed * sc + load(bias + i, count) + sk * cv;
          const vfloat zv = z_bias ? load(pz + i, count) + load(z_bias + i, count) : load(pz + i, count);
          const vfloat gyv = load(pgy + i, count);
          const vfloat sg = sigmoid(zv);
          // d/dz of z sigmoid(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
          const vfloat g_z = gyv * pre * sg * (1.0f + zv * (1.0f - sg));
          store(pgz + i, g_z, count);
          store(gzb + i, load(gzb + i, count) + g_z, count);
          const vfloat g_pre = gyv * zv * sg;  // lanes past count are 0 (gy loads as 0)
          store(pgc + i, g_pre * sk, count);
          store(gw + i, load(gw + i, count) + g_pre * normed, count);
          store(gb + i, load(gb + i, count) + g_pre, count);
          store(gs + i, load(gs + i, count) + g_pre * cv, count);
          const vfloat g_normed = g_pre * sc;
          sum_g += g_normed;
          sum_gn += g_normed * normed;
          store(normed_row + d0, normed, count);
          store(grad_normed + d0, g_normed, count);
        });
        norm_input_grad(normed_row, grad_normed, sum_g, sum_gn, rs, DH, pgh + off);
      }
    }
  });
  sum_partials(partial, threads, 4 * C, sums);
}

struct NormArgs {
  int64_t B, Tn, H, DH;
  at::Tensor scale, bias, skip;  // fp32 (C,)
  std::optional<at::Tensor> z_bias;  // fp32 (C,) or none
  const float* z_bias_data() const { return z_bias ? z_bias->data_ptr<float>() : nullptr; }
};

NormArgs check_norm_args(const at::Tensor& h, const at::Tensor& c, const at::Tensor& z, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& skip,
                         const std::optional<at::Tensor>& z_bias) {
  TORCH_CHECK(h.dim() == 4, "h must be a (B, T, H, DH) tensor, got ", h.sizes());
  const int64_t B = h.size(0), Tn = h.size(1), H = h.size(2), DH = h.size(3), C = H * DH;
  TORCH_CHECK(h.is_contiguous(), "h must be contiguous");
  check_tokens(h, h.sizes(), h.scalar_type(), "h");
  check_tokens(c, {B, Tn, C}, h.scalar_type(), "c");
  check_tokens(z, {B, Tn, C}, h.scalar_type(), "z");
  return {B, Tn, H, DH, channel_param(weight, C, "weight") + 1.0f, channel_param(bias, C, "bias"),
          channel_param(skip, C, "skip"),
          z_bias ? std::optional<at::Tensor>(channel_param(z_bias, C, "z_bias")) : std::nullopt};
}

// out = (HeadNorm(h) * (1 + weight) + bias + skip * c) * SiLU(z + z_bias); returns the norm's mean and 1 / std
// (B, T, H), fp32. h: (B, T, H, DH) contiguous; c, z, out: (B, T, H * DH) views with unit last strides, h's dtype;
// z_bias (H * DH,) or None: z's bias, when the product that gave z left it out (added in fp32 here).
std::tuple<at::Tensor, at::Tensor> gated_norm_forward(const at::Tensor& h, const at::Tensor& c, const at::Tensor& z,
                                                      const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                      const at::Tensor& skip, double eps, at::Tensor out,
                                                      const std::optional<at::Tensor>& z_bias) {
  const NormArgs a = check_norm_args(h, c, z, weight, bias, skip, z_bias);
  check_tokens(out, c.sizes(), h.scalar_type(), "out");
  auto mean = at::empty({a.B, a.Tn, a.H}, h.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  with_dtype(h.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    gated_norm_fwd<T>(tokens_of<const T>(h.view({a.B, a.Tn, -1})), tokens_of<const T>(c), tokens_of<const T>(z),
                      a.scale.data_ptr<float>(), a.bias.data_ptr<float>(), a.skip.data_ptr<float>(),
                      a.z_bias_data(), static_cast<float>(eps), tokens_of<T>(out), mean.data_ptr<float>(),
                      rstd.data_ptr<float>(), a.B, a.Tn, a.H, a.DH);
  });
  return {mean, rstd};
}

// The gradients of gated_norm_forward: (grad_h (B, T, H, DH), grad_c, grad_z (B, T, C), in h's dtype; the sums for
// weight, bias, skip and z_bias (C,) each, fp32: the last is grad_z's column sums). mean, rstd: as
// gated_norm_forward returned them; z_bias as given to it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_norm_backward(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& c, const at::Tensor& z, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& skip, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& z_bias) {
  const NormArgs a = check_norm_args(h, c, z, weight, bias, skip, z_bias);
  const int64_t C = a.H * a.DH;
  check_tokens(grad_y, c.sizes(), h.scalar_type(), "grad_y");
  for (const auto* stat : {&mean, &rstd})
    TORCH_CHECK(stat->scalar_type() == at::kFloat && stat->is_contiguous() && stat->numel() == a.B * a.Tn * a.H,
                "mean and rstd must be the contiguous float32 (B, T, H) statistics from gated_norm_forward");
  auto grad_h = at::empty_like(h);
  auto grad_c = at::empty({a.B, a.Tn, C}, h.options());
  auto grad_z = at::empty_like(grad_c);
  auto sums = at::empty({4, C}, h.options().dtype(at::kFloat));
  with_dtype(h.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    gated_norm_bwd<T>(tokens_of<const T>(grad_y), tokens_of<const T>(h.view({a.B, a.Tn, -1})), tokens_of<const T>(c),
                      tokens_of<const T>(z), a.scale.data_ptr<float>(), a.bias.data_ptr<float>(),
                      a.skip.data_ptr<float>(), a.z_bias_data(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                      tokens_of<T>(grad_h.view({a.B, a.Tn, -1})), tokens_of<T>(grad_c), tokens_of<T>(grad_z),
                      sums.data_ptr<float>(), a.B, a.Tn, a.H, a.DH);
  });
  return {grad_h, grad_c, grad_z, sums[0], sums[1], sums[2], sums[3]};
}

// ---------------------------------------------------------------------------------------------------------------
// conv_silu: a depthwise K x K convolution (zero padding K / 2, stride 1) of (B, T, C) tokens laid on a (height,
// width) grid row by row, then SiLU. One task per (image, channel vector; forward: two of them): the image's
// pixels of that vector are loaded once into a zero-bordered fp32 buffer, so each output is K * K multiply-adds from
// L1 without bounds checks, and the vector's K * K weights (in backward also their gradient sums) stay in registers.
// (Backward with two vectors per task, whose weights and sums no longer fit in the registers, was no faster: ViL-T's
// shape, 2 cores of a Xeon, session 29, ad hoc.)

template <int K>
struct Padded {  // a (height + K - 1) x (width + K - 1) grid of vectors, zero border of K / 2
  int64_t height, width, row;
  std::vector<vfloat> cells;
  Padded(int64_t h, int64_t w) : height(h), width(w), row(w + K - 1), cells((h + K - 1) * (w + K - 1)) {}
  vfloat* at(int64_t y, int64_t x) { return cells.data() + (y + K / 2) * row + x + K / 2; }  // y, x of the grid
};

// u = bias + sum_{ky, kx} w[ky, kx] x[y + ky - K / 2, x + kx - K / 2] at the pixel `centre` of a padded buffer
template <int K>
inline vfloat taps_sum(const vfloat* centre, int64_t row, const vfloat* w, vfloat start) {
  vfloat u = start;
#pragma GCC unroll 7
  for (int ky = 0; ky < K; ++ky)
#pragma GCC unroll 7
    for (int kx = 0; kx < K; ++kx) u += w[ky * K + kx] * centre[(ky - K / 2) * row + kx - K / 2];
  return u;
}

// Fill the buffer's interior with one image's pixels of a vector of channels from c0 (count of them; the rest 0)
template <int K, typename T>
inline void load_image(Padded<K>& buffer, const T* image, int64_t C, int64_t count) {
  for (int64_t y = 0; y < buffer.height; ++y)
    for (int64_t x = 0; x < buffer.width; ++x) *buffer.at(y, x) = load(image + (y * buffer.width + x) * C, count);
}

// The sums of NT tokens' rows of c (C apart) with the gates' weight rows g0 .. g0 + ng - 1 (ng <= 4) into
// gates[t * G + g]: NT x 4 accumulators in registers, each weight vector loaded once for the NT tokens (a token at a
// time loaded four weight vectors for every four multiply-adds). Each sum runs over the channel vectors in order.
template <int NT, typename T>
inline void gate_block(const T* c, int64_t C, const float* gate_w, int64_t G, int64_t g0, int64_t ng, T* gates) {
  vfloat acc[NT][4] = {};
  for_vectors(C, [&](int64_t c0, auto count) {
    vfloat w[4];
    for (int g = 0; g < 4; ++g) w[g] = g < ng ? load(gate_w + (g0 + g) * C + c0, count) : vfloat{};
    for (int t = 0; t < NT; ++t) {
      const vfloat cv = load(c + t * C + c0, count);
      for (int g = 0; g < 4; ++g) acc[t][g] += cv * w[g];
    }
  });
  for (int t = 0; t < NT; ++t)
    for (int64_t g = 0; g < ng; ++g) gates[t * G + g0 + g] = T(lane_sum(acc[t][g]));
}

template <typename T>
void gate_sums(const T* c, int64_t T_, int64_t C, const float* gate_w, int64_t G, T* gates) {
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    const int64_t ng = std::min<int64_t>(4, G - g0);
    int64_t t = 0;
    for (; t + 4 <= T_; t += 4) gate_block<4>(c + t * C, C, gate_w, G, g0, ng, gates + t * G);
    for (; t < T_; ++t) gate_block<1>(c + t * C, C, gate_w, G, g0, ng, gates + t * G);
  }
}

// With gate_w (G x C fp32), also gates[b, t, g] = sum_c c[b, t, c] gate_w[g, c] (B, T, G; c as stored, in T's
// dtype, summed in fp32, rounded once): the product of c with the gates' weights that would otherwise read c back
// from memory for G = 8 outputs a token (about 1 ms of each ViL-T layer in an fp32 training step, 52 GFLOP/s, 2
// cores, session 37). One task per image then, whose tokens' sums are taken once all its channels are written (its
// c is still in cache): 4 tokens x 4 outputs in registers over the channel vectors (gate_block). (Adding each pair's
// share to per-token vectors in memory as c was written instead ran the conv at 0.55x.) ViL-T's layer shape, 2 cores
// of a Xeon without AMX, session 37, conv + product against this: 1.14x fp32 / 1.18x bf16 (medians) with everything
// in cache, 1.31x fp32 with the inputs coming from memory (caches flushed between calls).
template <int K, typename T>
void conv_silu_fwd(const T* x, const float* table, const float* bias, T* out, int64_t B, int64_t C, int64_t height,
                   int64_t width, const float* gate_w = nullptr, int64_t G = 0, T* gates = nullptr) {
  const int64_t T_ = height * width, pairs = (C + 2 * kLanes - 1) / (2 * kLanes);
  // one task per (image, two channel vectors): with AVX-512 a task reads and writes whole 64-byte lines of bf16
  // tokens (32 channels), and its two vectors' sums are independent chains; enough tasks for 2 threads at any batch
  // (with gates: one task per image, its pairs in turn)
  const int64_t per_task = gate_w ? pairs : 1;
  at::parallel_for(0, B * pairs / per_task, 1, [&](int64_t begin, int64_t end) {
    Padded<K> image[2] = {Padded<K>(height, width), Padded<K>(height, width)};
    vfloat w[2][K * K];
    for (int64_t task = begin * per_task; task < end * per_task; ++task) {
      const int64_t b = task / pairs, c0 = (task % pairs) * 2 * kLanes;
      const int64_t count[2] = {std::min(kLanes, C - c0), std::max<int64_t>(0, std::min(kLanes, C - c0 - kLanes))};
      const int nv = count[1] > 0 ? 2 : 1;
      vfloat bv[2];
      for (int v = 0; v < nv; ++v) {
        const int64_t cv = c0 + v * kLanes;
        for (int i = 0; i < K * K; ++i) w[v][i] = load(table + i * C + cv, count[v]);
        bv[v] = load(bias + cv, count[v]);
        load_image(image[v], x + b * T_ * C + cv, C, count[v]);
      }
      T* o = out + b * T_ * C + c0;
      if (nv == 2) {
        for (int64_t y = 0; y < height; ++y)
          for (int64_t xx = 0; xx < width; ++xx) {
            const vfloat u0 = taps_sum<K>(image[0].at(y, xx), image[0].row, w[0], bv[0]);
            const vfloat u1 = taps_sum<K>(image[1].at(y, xx), image[1].row, w[1], bv[1]);
            T* p = o + (y * width + xx) * C;
            store(p, u0 * sigmoid(u0), kLanes);
            store(p + kLanes, u1 * sigmoid(u1), count[1]);
          }
      } else {
        for (int64_t y = 0; y < height; ++y)
          for (int64_t xx = 0; xx < width; ++xx) {
            const vfloat u = taps_sum<K>(image[0].at(y, xx), image[0].row, w[0], bv[0]);
            store(o + (y * width + xx) * C, u * sigmoid(u), count[0]);
          }
      }
      if (gate_w && task % pairs == pairs - 1) {  // the image's last pair: all its channels are written
        gate_sums(out + b * T_ * C, T_, C, gate_w, G, gates + b * T_ * G);
      }
    }
  });
}

// What conv_silu_bwd sums into c's gradient beyond grad_out, and what it adds to x's (all optional; null: none):
// c's gradients from elsewhere (more, (B, T, C) in T's dtype) and through the gates' product gates = c @ gate_w^T
// (gate_grad (B, T, G) fp32, gate_w (G, C) fp32), whose weight gradient gate_grad^T c it then sums too (into the
// `sums` rows after the bias's), from c = SiLU(u) as the forward writes it; and an addend of x's gradient (x's
// gradient from elsewhere, (B, T, C) in T's dtype). The layer's backward passes these rather than summing the
// gradients of c and x_m in passes of their own over (B, T, C) memory.
template <typename T>
struct ConvGradExtras {
  const T* more = nullptr;
  const float* gate_grad = nullptr;
  const float* gate_w = nullptr;
  int64_t G = 0;
  const T* addend = nullptr;
};

// The gradients of conv_silu_fwd for grad_out: grad_x (x's dtype) and the sums of the weight table and the bias
// (fp32, K * K + 1 rows of C in `sums`, then with extras' gates G rows of the gates' weight gradient). Per (image,
// channel vector): the convolution again, SiLU's gradient into a second padded buffer, the weight sums from the two
// buffers, then the transposed convolution of the second.
template <int K, typename T>
void conv_silu_bwd(const T* grad_out, const T* x, const float* table, const float* bias, T* grad_x, float* sums,
                   int64_t B, int64_t C, int64_t height, int64_t width, const ConvGradExtras<T>& extras = {}) {
  const int64_t T_ = height * width, vectors = (C + kLanes - 1) / kLanes;
  const int64_t threads = at::get_num_threads(), G = extras.gate_grad ? extras.G : 0, rows = K * K + 1 + G;
  std::vector<float> partial(threads * rows * C, 0.0f);
  at::parallel_for(0, B * vectors, 1, [&](int64_t begin, int64_t end) {
    float* part = partial.data() + at::get_thread_num() * rows * C;
    Padded<K> image(height, width), grad_u(height, width);
    std::vector<vfloat> c_values(G ? T_ : 0);  // c's pixels for the gates' weight sums
    vfloat w[K * K], w_flipped[K * K];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / vectors, c0 = (task % vectors) * kLanes;
      // (compiled for whole vectors apart: with the count a runtime value, each bf16 load went through the stack)
      with_count(std::min(kLanes, C - c0), [&](auto count) {
        // The next image's memory, a vector's share of it per task (its tasks follow this image's in this thread),
        // fetched in address order while this image's tasks compute: each input's image is one contiguous block, and
        // the core's own streaming prefetch follows such a run. (Fetching the next task's column instead, a vector's
        // T rows C apart, stalled on the core's line-fill buffers for about half of this kernel's time, session 40's
        // profile.) The share's lines are spread over the pixel loop below, a few per pixel: issued in one burst
        // before it, they stalled on those buffers for a sixth of this kernel's samples (session 44's profile).
        constexpr int64_t kLine = 64 / sizeof(T);
        const T* fetched[4] = {};
        int64_t sources = 0, fetch_from = 0, fetch_lines = 0;
        if ((b + 1) * vectors < end) {
          const int64_t image = T_ * C, share = (image + vectors - 1) / vectors;
          fetch_from = (b + 1) * image + (task % vectors) * share;
          const int64_t to = std::min((b + 1) * image + image, fetch_from + share);
          fetch_lines = std::max<int64_t>(0, (to - fetch_from + kLine - 1) / kLine);
          for (const T* src : {grad_out, x, extras.more, extras.addend})
            if (src != nullptr) fetched[sources++] = src + fetch_from;
        }
        T* const fetched_out = fetch_lines > 0 ? grad_x + fetch_from : nullptr;  // (written: asked to own it)
        for (int i = 0; i < K * K; ++i) {
          w[i] = load(table + i * C + c0, count);
          w_flipped[K * K - 1 - i] = w[i];
        }
        const vfloat bv = load(bias + c0, count);
        load_image(image, x + b * T_ * C + c0, C, count);
        const T* go = grad_out + b * T_ * C + c0;
        const T* more = extras.more ? extras.more + b * T_ * C + c0 : nullptr;
        const float* gg = G ? extras.gate_grad + b * T_ * G : nullptr;
        vfloat gw[K * K] = {}, gb{};
        // the gates' weights for these channels, up to 8 in registers (G is 2 per head: 8 for ViL's 4 heads)
        vfloat gate_w[8];
        for (int64_t g = 0; g < std::min<int64_t>(G, 8); ++g) gate_w[g] = load(extras.gate_w + g * C + c0, count);
        for (int64_t y = 0; y < height; ++y)
          for (int64_t xx = 0; xx < width; ++xx) {
            const int64_t t = y * width + xx;
            for (int64_t line = t * fetch_lines / T_; line < (t + 1) * fetch_lines / T_; ++line) {
              for (int64_t i = 0; i < sources; ++i) __builtin_prefetch(fetched[i] + line * kLine);
              __builtin_prefetch(fetched_out + line * kLine, 1);
            }
            const vfloat u = taps_sum<K>(image.at(y, xx), image.row, w, bv);
            const vfloat s = sigmoid(u);
            vfloat gc = load(go + t * C, count);
            if (more) gc += load(more + t * C, count);
            if (G) {
              const float* gt = gg + t * G;
#pragma GCC unroll 8
              for (int g = 0; g < 8; ++g)
                if (g < G) gc += gt[g] * gate_w[g];
              for (int64_t g = 8; g < G; ++g) gc += gt[g] * load(extras.gate_w + g * C + c0, count);
              if constexpr (std::is_same_v<T, float>) {
                c_values[t] = u * s;
              } else {  // c as the forward wrote it (rounded to T)
                T c_row[kLanes];
                store(c_row, u * s, count);
                c_values[t] = load(c_row, count);
              }
            }
            // d/du of u sigmoid(u) = sigmoid(u) (1 + u (1 - sigmoid(u)))
            const vfloat gu = gc * s * (1.0f + u * (1.0f - s));
            *grad_u.at(y, xx) = gu;
            gb += gu;
          }
        // the weight sums in a loop of their own: in the loop above, beside the weights and the exp's constants,
        // their K * K accumulators spilled to the stack (a load and a store each per pixel)
        for (int64_t y = 0; y < height; ++y)
          for (int64_t xx = 0; xx < width; ++xx) {
            const vfloat* centre = image.at(y, xx);
            const vfloat gu = *grad_u.at(y, xx);
#pragma GCC unroll 7
            for (int ky = 0; ky < K; ++ky)
#pragma GCC unroll 7
              for (int kx = 0; kx < K; ++kx) gw[ky * K + kx] += gu * centre[(ky - K / 2) * image.row + kx - K / 2];
          }
        for (int i = 0; i < K * K; ++i) store(part + i * C + c0, load(part + i * C + c0, count) + gw[i], count);
        store(part + K * K * C + c0, load(part + K * K * C + c0, count) + gb, count);
        for (int64_t g0 = 0; g0 < G; g0 += 8) {  // the gates' weight sums, 8 at a time in registers
          const int64_t ng = std::min<int64_t>(8, G - g0);
          vfloat acc[8] = {};
          for (int64_t t = 0; t < T_; ++t) {
            const float* gt = gg + t * G + g0;
#pragma GCC unroll 8
            for (int g = 0; g < 8; ++g)
              if (g < ng) acc[g] += gt[g] * c_values[t];
          }
          for (int64_t g = 0; g < ng; ++g) {
            float* p = part + (K * K + 1 + g0 + g) * C + c0;
            store(p, load(p, count) + acc[g], count);
          }
        }
        // grad_x[y, x] = sum_{ky, kx} w[ky, kx] grad_u[y - ky + K / 2, x - kx + K / 2]: the flipped kernel
        T* gx = grad_x + b * T_ * C + c0;
        const T* plus = extras.addend ? extras.addend + b * T_ * C + c0 : nullptr;
        for (int64_t y = 0; y < height; ++y)
          for (int64_t xx = 0; xx < width; ++xx) {
            const int64_t t = y * width + xx;
            vfloat sum = taps_sum<K>(grad_u.at(y, xx), grad_u.row, w_flipped, vfloat{});
            if (plus) sum += load(plus + t * C, count);
            store(gx + t * C, sum, count);
          }
      });
    }
  });
  sum_partials(partial, threads, rows * C, sums);
}

// Calls fn(std::integral_constant<int, K>) for the kernel size k (1, 3, 5 or 7)
template <typename Fn>
void with_kernel_size(int64_t k, Fn&& fn) {
  switch (k) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    default: fn(std::integral_constant<int, 7>{}); break;
  }
}

// The weight (C, 1, k, k) as the (k * k, C) fp32 table, after checking the shapes
at::Tensor conv_table(const at::Tensor& x, int64_t height, int64_t width, const at::Tensor& weight) {
  check_rows(x, "x");
  const int64_t C = x.size(2);
  TORCH_CHECK(height > 0 && width > 0 && height * width == x.size(1), "got ", x.size(1), " tokens for a ", height,
              "x", width, " grid");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == weight.size(3) &&
                  weight.size(2) % 2 == 1 && weight.size(2) <= 7,
              "weight must have shape (", C, ", 1, k, k) with k = 1, 3, 5 or 7 (a depthwise kernel), got ",
              weight.sizes());
  return weight.to(at::kFloat).reshape({C, -1}).t().contiguous();
}

// out = SiLU(depthwise conv(x) + bias): x, out (B, T, C) contiguous, one dtype; weight (C, 1, k, k); bias (C,) or None.
// With gate_w (G, C) (any floating dtype, used in fp32: pass it rounded to x's dtype as a product in that dtype
// would use it), also returns gates = out @ gate_w^T (B, T, G) in x's dtype (conv_silu_fwd); else an empty tensor.
at::Tensor conv_silu_forward(const at::Tensor& x, int64_t height, int64_t width, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::Tensor out,
                             const std::optional<at::Tensor>& gate_w) {
  const auto table = conv_table(x, height, width, weight);
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  check_tokens(out, x.sizes(), x.scalar_type(), "out");
  const int64_t C = x.size(2);
  const auto b32 = channel_param(bias, C, "bias");
  at::Tensor gates, g32;
  if (gate_w) {
    TORCH_CHECK(gate_w->dim() == 2 && gate_w->size(1) == C && gate_w->size(0) > 0,
                "gate_w must have shape (G, ", C, "), got ", gate_w->sizes());
    g32 = gate_w->to(at::kFloat).contiguous();
    gates = at::empty({x.size(0), x.size(1), gate_w->size(0)}, x.options());
  }
  with_kernel_size(weight.size(2), [&](auto size) {
    constexpr int K = decltype(size)::value;
    with_dtype(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      conv_silu_fwd<K, T>(x.data_ptr<T>(), table.data_ptr<float>(), b32.data_ptr<float>(), out.data_ptr<T>(),
                          x.size(0), C, height, width, gate_w ? g32.data_ptr<float>() : nullptr,
                          gate_w ? g32.size(0) : 0, gate_w ? gates.data_ptr<T>() : nullptr);
    });
  });
  return gate_w ? gates : at::empty({0}, x.options());
}

// conv_silu_forward's gradients with what the layer's backward sums around it (ConvGradExtras), for c's gradient
// grad_out + more + gate_grad @ gate_w: (grad_x (B, T, C) in x's dtype, plus addend where given; grad_weight (C, 1,
// k, k), grad_bias (C,) and, with gate_grad, gate_w's gradient gate_grad^T c (G, C), all fp32; else an empty
// tensor). more, addend: (B, T, C) contiguous in x's dtype or None; gate_grad (B, T, G) any floating dtype (used
// in fp32) with gate_w (G, C) (as conv_silu_forward took it), or both None.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_silu_backward_summed(
    const at::Tensor& grad_out, const at::Tensor& x, int64_t height, int64_t width, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& more,
    const std::optional<at::Tensor>& gate_grad, const std::optional<at::Tensor>& gate_w,
    const std::optional<at::Tensor>& addend) {
  const auto table = conv_table(x, height, width, weight);
  TORCH_CHECK(grad_out.is_contiguous(), "grad_out must be contiguous");
  check_tokens(grad_out, x.sizes(), x.scalar_type(), "grad_out");
  for (const auto& [t, what] : {std::pair{&more, "more"}, std::pair{&addend, "addend"}}) {
    if (!*t) continue;
    TORCH_CHECK((*t)->is_contiguous(), what, " must be contiguous");
    check_tokens(**t, x.sizes(), x.scalar_type(), what);
  }
  TORCH_CHECK(gate_grad.has_value() == gate_w.has_value(), "gate_grad and gate_w come together");
  const int64_t C = x.size(2), k = weight.size(2), G = gate_w ? gate_w->size(0) : 0;
  at::Tensor gg32, gw32;
  if (gate_w) {
    TORCH_CHECK(gate_w->dim() == 2 && gate_w->size(1) == C && G > 0, "gate_w must have shape (G, ", C, "), got ",
                gate_w->sizes());
    TORCH_CHECK(gate_grad->dim() == 3 && gate_grad->size(0) == x.size(0) && gate_grad->size(1) == x.size(1) &&
                    gate_grad->size(2) == G,
                "gate_grad must have shape (", x.size(0), ", ", x.size(1), ", ", G, "), got ", gate_grad->sizes());
    gg32 = gate_grad->to(at::kFloat).contiguous();
    gw32 = gate_w->to(at::kFloat).contiguous();
  }
  const auto b32 = channel_param(bias, C, "bias");
  auto grad_x = at::empty_like(x);
  auto sums = at::empty({k * k + 1 + G, C}, x.options().dtype(at::kFloat));
  with_kernel_size(k, [&](auto size) {
    constexpr int K = decltype(size)::value;
    with_dtype(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      ConvGradExtras<T> extras;
      extras.more = more ? more->data_ptr<T>() : nullptr;
      extras.addend = addend ? addend->data_ptr<T>() : nullptr;
      if (gate_w) extras.gate_grad = gg32.data_ptr<float>(), extras.gate_w = gw32.data_ptr<float>(), extras.G = G;
      conv_silu_bwd<K, T>(grad_out.data_ptr<T>(), x.data_ptr<T>(), table.data_ptr<float>(), b32.data_ptr<float>(),
                          grad_x.data_ptr<T>(), sums.data_ptr<float>(), x.size(0), C, height, width, extras);
    });
  });
  auto grad_weight = sums.narrow(0, 0, k * k).t().reshape({C, 1, k, k});
  auto grad_gate = gate_w ? sums.narrow(0, k * k + 1, G).clone() : at::empty({0}, x.options().dtype(at::kFloat));
  return {grad_x, grad_weight, sums[k * k].clone(), grad_gate};
}

// The gradients of conv_silu_forward: (grad_x (B, T, C) in x's dtype, grad_weight (C, 1, k, k) and grad_bias (C,)
// in fp32)
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_silu_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                  int64_t height, int64_t width,
                                                                  const at::Tensor& weight,
                                                                  const std::optional<at::Tensor>& bias) {
  auto [grad_x, grad_w, grad_b, unused] = conv_silu_backward_summed(grad_out, x, height, width, weight, bias,
                                                                    std::nullopt, std::nullopt, std::nullopt,
                                                                    std::nullopt);
  return {grad_x, grad_w, grad_b};
}

// ---------------------------------------------------------------------------------------------------------------
// fold_gates: the layer's folded gate weights (layers.py, ViLLayer._folded_projections) from its parameters, and
// their backward. The gates read [q, k, v] with q = Wq c + bq, k = Wk c + bk (block-diagonal W, blocks (nb, bs, bs)),
// v = Wv x_m + bv and x_m = W_m x + b_m, so with G = [Gq, Gk, Gv] (the input and forget gates' weights, 2H rows):
//   gate_c = Gq Wq + Gk Wk (2H, inner), gate_v = Gv Wv, w_g = gate_v W_m (2H, D),
//   gate_b = [b_i, b_f] + G [bq, bk, bv] + gate_v b_m.
// As PyTorch operations these were a few dozen small operations and autograd nodes a layer, every step, on the main
// thread while the other waits; here one call each way (ViL-T's 24 layers: 7.8 -> 5.1 ms forward, 16.6 -> 10.7 ms
// backward a step, 2 threads of an AMX Xeon, session 44), the block-diagonal folds as loops (2H x inner x bs
// multiply-adds each), the thin products through at::mm (in fp32 under autocast too). All float32.

// folded[g, j bs + i] = sum_o gw[g, j bs + o] w[j, o, i] for the rows g of gw (ld apart) and one block weight w
inline void fold_blocks(const float* gw, int64_t ld, const float* w, int64_t rows, int64_t nb, int64_t bs,
                        float* folded, int64_t ld_out, bool add) {
  for (int64_t g = 0; g < rows; ++g)
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t i = 0; i < bs; ++i) {
        float sum = 0.0f;
        for (int64_t o = 0; o < bs; ++o) sum += gw[g * ld + j * bs + o] * w[(j * bs + o) * bs + i];
        folded[g * ld_out + j * bs + i] = add ? folded[g * ld_out + j * bs + i] + sum : sum;
      }
}

void check_fold_params(const std::vector<at::Tensor>& params) {
  for (const auto& p : params)
    TORCH_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous() && p.device().is_cpu(),
                "fold_gates takes contiguous float32 CPU parameters, got ", p.scalar_type(), " ", p.sizes());
}

// (w_g (2H, D), gate_b (2H,), gate_c (2H, inner), gate_v (2H, inner)) from w_i, w_f (H, 3 inner), w_q, w_k, w_v
// (nb, bs, bs), b_q, b_k, b_v, b_m (inner,), w_m (inner, D), b_i, b_f (H,)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fold_gates(
    const at::Tensor& w_i, const at::Tensor& w_f, const at::Tensor& w_q, const at::Tensor& w_k, const at::Tensor& w_v,
    const at::Tensor& b_q, const at::Tensor& b_k, const at::Tensor& b_v, const at::Tensor& w_m, const at::Tensor& b_m,
    const at::Tensor& b_i, const at::Tensor& b_f) {
  check_fold_params({w_i, w_f, w_q, w_k, w_v, b_q, b_k, b_v, w_m, b_m, b_i, b_f});
  // (under autocast at::mm would round its operands to bf16)
  c10::impl::ExcludeDispatchKeyGuard fp32_products(c10::autocast_dispatch_keyset);
  const int64_t H = w_i.size(0), G = 2 * H, nb = w_q.size(0), bs = w_q.size(1), inner = nb * bs;
  TORCH_CHECK(w_i.sizes() == w_f.sizes() && w_i.dim() == 2 && w_i.size(1) == 3 * inner && w_m.size(0) == inner &&
                  w_q.sizes() == w_k.sizes() && w_q.sizes() == w_v.sizes() && w_q.size(2) == bs &&
                  b_q.numel() == inner && b_k.numel() == inner && b_v.numel() == inner && b_m.numel() == inner &&
                  b_i.numel() == H && b_f.numel() == H,
              "fold_gates: inconsistent shapes");
  auto gate_c = at::empty({G, inner}, w_i.options());
  auto gate_v = at::empty({G, inner}, w_i.options());
  auto gate_b = at::empty({G}, w_i.options());
  const float* gw[2] = {w_i.data_ptr<float>(), w_f.data_ptr<float>()};
  const float* bias[3] = {b_q.data_ptr<float>(), b_k.data_ptr<float>(), b_v.data_ptr<float>()};
  const float* b_if[2] = {b_i.data_ptr<float>(), b_f.data_ptr<float>()};
  for (int half = 0; half < 2; ++half) {  // the input gates' rows, then the forget gates'
    float* c = gate_c.data_ptr<float>() + half * H * inner;
    float* v = gate_v.data_ptr<float>() + half * H * inner;
    fold_blocks(gw[half], 3 * inner, w_q.data_ptr<float>(), H, nb, bs, c, inner, false);
    fold_blocks(gw[half] + inner, 3 * inner, w_k.data_ptr<float>(), H, nb, bs, c, inner, true);
    fold_blocks(gw[half] + 2 * inner, 3 * inner, w_v.data_ptr<float>(), H, nb, bs, v, inner, false);
    for (int64_t h = 0; h < H; ++h) {
      vfloat sum{};
      for (int t = 0; t < 3; ++t) {
        const float* row = gw[half] + h * 3 * inner + t * inner;
        for_vectors(inner, [&](int64_t e, auto count) { sum += load(row + e, count) * load(bias[t] + e, count); });
      }
      const float* pbm = b_m.data_ptr<float>();
      for_vectors(inner, [&](int64_t e, auto count) {
        sum += load(v + h * inner + e, count) * load(pbm + e, count);
      });
      gate_b.data_ptr<float>()[half * H + h] = b_if[half][h] + lane_sum(sum);
    }
  }
  return {at::mm(gate_v, w_m), gate_b, gate_c, gate_v};
}

// The gradients of fold_gates's inputs (in its order) for those of w_g, gate_b and gate_c; gate_v as it returned
std::vector<at::Tensor> fold_gates_backward(const at::Tensor& grad_w_g, const at::Tensor& grad_gate_b,
                                            const at::Tensor& grad_gate_c, const at::Tensor& gate_v,
                                            const at::Tensor& w_i, const at::Tensor& w_f, const at::Tensor& w_q,
                                            const at::Tensor& w_k, const at::Tensor& w_v, const at::Tensor& b_q,
                                            const at::Tensor& b_k, const at::Tensor& b_v, const at::Tensor& w_m,
                                            const at::Tensor& b_m) {
  check_fold_params({grad_w_g, grad_gate_b, grad_gate_c, gate_v, w_i, w_f, w_q, w_k, w_v, b_q, b_k, b_v, w_m, b_m});
  c10::impl::ExcludeDispatchKeyGuard fp32_products(c10::autocast_dispatch_keyset);
  const int64_t H = w_i.size(0), G = 2 * H, nb = w_q.size(0), bs = w_q.size(1), inner = nb * bs;
  TORCH_CHECK(grad_w_g.size(0) == G && grad_gate_b.numel() == G && grad_gate_c.size(0) == G &&
                  grad_gate_c.size(1) == inner && gate_v.sizes() == grad_gate_c.sizes(),
              "fold_gates_backward: inconsistent shapes");
  // gate_v's gradient: through w_g = gate_v W_m and through gate_b's gate_v b_m
  auto grad_gate_v = at::mm(grad_w_g, w_m.t());
  auto grad_w_m = at::mm(gate_v.t(), grad_w_g);
  const float* gb = grad_gate_b.data_ptr<float>();
  const float* pbm = b_m.data_ptr<float>();
  float* ggv = grad_gate_v.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t e = 0; e < inner; ++e) ggv[g * inner + e] += gb[g] * pbm[e];
  auto grad_b_m = at::zeros({inner}, w_i.options());
  const float* gv = gate_v.data_ptr<float>();
  float* gbm = grad_b_m.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t e = 0; e < inner; ++e) gbm[e] += gv[g * inner + e] * gb[g];
  const at::Tensor blocks[3] = {w_q, w_k, w_v};
  const float* bias[3] = {b_q.data_ptr<float>(), b_k.data_ptr<float>(), b_v.data_ptr<float>()};
  const float* grad_folded[3] = {grad_gate_c.data_ptr<float>(), grad_gate_c.data_ptr<float>(), ggv};
  at::Tensor grad_gw[2] = {at::empty_like(w_i), at::empty_like(w_f)};
  at::Tensor grad_blocks[3] = {at::zeros_like(w_q), at::zeros_like(w_k), at::zeros_like(w_v)};
  at::Tensor grad_bias[3] = {at::zeros({inner}, w_i.options()), at::zeros({inner}, w_i.options()),
                             at::zeros({inner}, w_i.options())};
  const float* gw[2] = {w_i.data_ptr<float>(), w_f.data_ptr<float>()};
  for (int half = 0; half < 2; ++half)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = half * H + h;
      for (int t = 0; t < 3; ++t) {
        const float* w = blocks[t].data_ptr<float>();
        const float* df = grad_folded[t] + g * inner;
        const float* row = gw[half] + h * 3 * inner + t * inner;
        float* dgw = grad_gw[half].data_ptr<float>() + h * 3 * inner + t * inner;
        float* dw = grad_blocks[t].data_ptr<float>();
        float* db = grad_bias[t].data_ptr<float>();
        for (int64_t j = 0; j < nb; ++j)
          for (int64_t o = 0; o < bs; ++o) {
            float sum = gb[g] * bias[t][j * bs + o];  // through gate_b's G [bq, bk, bv]
            for (int64_t i = 0; i < bs; ++i) {
              sum += df[j * bs + i] * w[(j * bs + o) * bs + i];
              dw[(j * bs + o) * bs + i] += row[j * bs + o] * df[j * bs + i];
            }
            dgw[j * bs + o] = sum;
            db[j * bs + o] += row[j * bs + o] * gb[g];
          }
      }
    }
  return {grad_gw[0], grad_gw[1], grad_blocks[0], grad_blocks[1], grad_blocks[2], grad_bias[0], grad_bias[1],
          grad_bias[2], grad_w_m, grad_b_m, grad_gate_b.narrow(0, 0, H).clone(), grad_gate_b.narrow(0, H, H).clone()};
}

// ---------------------------------------------------------------------------------------------------------------
// column_sums: a bias's gradient, the fp32 sums over the rows of a (N, C) gradient. PyTorch's sum over dim 0 of a
// bf16 (8192, 384) tensor took about twice what this pass takes (ViL-T's up-projections, 2 threads of a Xeon,
// session 32, ad hoc: 1469-1719 against 745 us, a plain copy of the tensor 512 us, all from memory).

// sum_{r0 <= r < r1} x[r, c] for the NV vectors of channels from c0 (whole vectors, or one of count channels when
// NV is 0), added to sums[c]: NV accumulators over the rows
template <typename T, int NV_>
inline void column_tile(const T* x, int64_t r0, int64_t r1, int64_t C, int64_t c0, int64_t count, float* sums) {
  constexpr int NV = NV_ > 0 ? NV_ : 1;
  const int64_t n = NV_ > 0 ? kLanes : count;
  vfloat acc[NV] = {};
  for (int64_t r = r0; r < r1; ++r)
    for (int v = 0; v < NV; ++v) acc[v] += load(x + r * C + c0 + v * kLanes, n);
  for (int v = 0; v < NV; ++v) store(sums + c0 + v * kLanes, load(sums + c0 + v * kLanes, n) + acc[v], n);
}

template <typename T>
void column_sums_rows(const T* x, int64_t N, int64_t C, float* out) {
  constexpr int kTile = 8;            // vectors per pass
  constexpr int64_t kRowBlock = 64;   // rows per block: the block's rows stay in L1 between the passes over it
  const int64_t threads = at::get_num_threads();
  std::vector<float> partial(threads * C, 0.0f);
  // one contiguous range of rows per thread, each summed into its own partial row
  at::parallel_for(0, N, (N + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    float* sums = partial.data() + at::get_thread_num() * C;
    for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
      const int64_t r1 = std::min(end, r0 + kRowBlock);
      int64_t c0 = 0;
      for (; c0 + kTile * kLanes <= C; c0 += kTile * kLanes) column_tile<T, kTile>(x, r0, r1, C, c0, kLanes, sums);
      for (; c0 + kLanes <= C; c0 += kLanes) column_tile<T, 1>(x, r0, r1, C, c0, kLanes, sums);
      if (c0 < C) column_tile<T, 0>(x, r0, r1, C, c0, C - c0, sums);
    }
  });
  sum_partials(partial, threads, C, out);
}

// x (N, C) contiguous, float32 or bfloat16 -> its column sums (C,), float32
at::Tensor column_sums(const at::Tensor& x) {
  check_float_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (N, C) tensor, got shape ", x.sizes());
  auto out = at::empty({x.size(1)}, x.options().dtype(at::kFloat));
  with_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    column_sums_rows<T>(x.data_ptr<T>(), x.size(0), x.size(1), out.data_ptr<float>());
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// token_norm and add_reversed: the ViL block around its layer. The block normalises its (B, T, D) input (an offset
// layer norm), hands it to the layer (in the reversed block in reversed token order, in the autocast dtype), and
// adds the layer's output back (reversed again). PyTorch: a layer norm in fp32, a flip, a cast; a flip and an add
// (and in backward the same in reverse). Here: one pass each way for the norm (reading the input in its dtype,
// writing the output in the layer's dtype and order), and one for the residual sum.

template <typename TI, typename TO>
void token_norm_fwd(const TI* x, const float* scale, const float* bias, float eps, bool reverse, TO* y, float* mean,
                    float* rstd, int64_t B, int64_t Tn, int64_t D) {
  at::parallel_for(0, B * Tn, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Tn, t = r % Tn;
      const TI* px = x + r * D;
      TO* py = y + (b * Tn + (reverse ? Tn - 1 - t : t)) * D;
      float mu, rs;
      head_stats(px, D, eps, mu, rs);
      mean[r] = mu;
      rstd[r] = rs;
      for_vectors(D, [&](int64_t i, auto count) {
        store(py + i, (load(px + i, count) - mu) * rs * load(scale + i, count) + load(bias + i, count), count);
      });
    }
  });
}

// The gradients of token_norm_fwd for gy (in y's order): grad_x (x's dtype, x's order) and the sums of the scale's
// and the bias's gradients (fp32, 2 rows of D in `sums`), per-thread partial rows as in gated_norm_bwd.
template <typename TI, typename TO>
void token_norm_bwd(const TO* gy, const TI* x, const float* scale, const float* mean, const float* rstd, bool reverse,
                    const TI* plus, TI* gx, float* sums, int64_t B, int64_t Tn, int64_t D) {
  const int64_t N = B * Tn, threads = at::get_num_threads();
  std::vector<float> partial(threads * 2 * D, 0.0f);
  at::parallel_for(0, N, (N + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    float* gw = partial.data() + at::get_thread_num() * 2 * D;
    float* gb = gw + D;
    std::vector<float> buffer(2 * D);
    float *normed_row = buffer.data(), *grad_normed = buffer.data() + D;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Tn, t = r % Tn;
      const TI* px = x + r * D;
      const TO* pg = gy + (b * Tn + (reverse ? Tn - 1 - t : t)) * D;
      const float mu = mean[r], rs = rstd[r];
      vfloat sum_g{}, sum_gn{};
      for_vectors(D, [&](int64_t i, auto count) {
        const vfloat normed = (load(px + i, count) - mu) * rs, g = load(pg + i, count);
        store(gw + i, load(gw + i, count) + g * normed, count);
        store(gb + i, load(gb + i, count) + g, count);
        const vfloat g_normed = g * load(scale + i, count);  // lanes past count are 0 (g loads as 0)
        sum_g += g_normed;
        sum_gn += g_normed * normed;
        store(normed_row + i, normed, count);
        store(grad_normed + i, g_normed, count);
      });
      norm_input_grad(normed_row, grad_normed, sum_g, sum_gn, rs, D, gx + r * D, plus ? plus + r * D : nullptr);
    }
  });
  sum_partials(partial, threads, 2 * D, sums);
}

// out[b, t] = x[b, t] + y[b, T - 1 - t] (in x's dtype); with x == nullptr, out[b, t] = y[b, T - 1 - t] (a flip and a
// cast: the residual sum's gradient for y)
template <typename TX, typename TY>
void add_reversed_rows(const TX* x, const TY* y, TX* out, int64_t B, int64_t Tn, int64_t D) {
  at::parallel_for(0, B * Tn, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Tn, t = r % Tn;
      const TY* py = y + (b * Tn + Tn - 1 - t) * D;
      for_vectors(D, [&](int64_t i, auto count) {
        const vfloat v = load(py + i, count);
        store(out + r * D + i, x ? load(x + r * D + i, count) + v : v, count);
      });
    }
  });
}

// out (B, T, D), its dtype the layer's = LayerNorm(x) * (1 + weight) + bias, token order reversed when `reverse`;
// returns the norm's mean and 1 / std per token of x (B, T), fp32. x: (B, T, D) contiguous.
std::tuple<at::Tensor, at::Tensor> token_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias, double eps, bool reverse,
                                                      at::Tensor out) {
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes(), "out must have the shape ", x.sizes(), ", got ", out.sizes());
  const int64_t B = x.size(0), Tn = x.size(1), D = x.size(2);
  const auto scale = channel_param(weight, D, "weight") + 1.0f;
  const auto b32 = channel_param(bias, D, "bias");
  auto mean = at::empty({B, Tn}, x.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  with_dtype(x.scalar_type(), [&](auto in_tag) {
    using TI = decltype(in_tag);
    with_dtype(out.scalar_type(), [&](auto out_tag) {
      using TO = decltype(out_tag);
      token_norm_fwd<TI, TO>(x.data_ptr<TI>(), scale.data_ptr<float>(), b32.data_ptr<float>(),
                             static_cast<float>(eps), reverse, out.data_ptr<TO>(), mean.data_ptr<float>(),
                             rstd.data_ptr<float>(), B, Tn, D);
    });
  });
  return {mean, rstd};
}

// The gradients of token_norm_forward: (grad_x in x's dtype, grad_weight and grad_bias (D,) in fp32). addend: a
// gradient of x from elsewhere (the block's residual sum; x's dtype, shape and order) summed into grad_x by the same
// pass, or None.
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& rstd, bool reverse,
                                                                   const std::optional<at::Tensor>& addend) {
  check_rows(x, "x");
  check_rows(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have the shape ", x.sizes(), ", got ", grad_out.sizes());
  if (addend) {
    check_rows(*addend, "addend");
    TORCH_CHECK(addend->sizes() == x.sizes() && addend->scalar_type() == x.scalar_type(),
                "addend must have x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ", addend->sizes(),
                " and ", addend->scalar_type());
  }
  const int64_t B = x.size(0), Tn = x.size(1), D = x.size(2);
  for (const auto* stat : {&mean, &rstd})
    TORCH_CHECK(stat->scalar_type() == at::kFloat && stat->is_contiguous() && stat->numel() == B * Tn,
                "mean and rstd must be the contiguous float32 (B, T) statistics from token_norm_forward");
  const auto scale = channel_param(weight, D, "weight") + 1.0f;
  auto grad_x = at::empty_like(x);
  auto sums = at::empty({2, D}, x.options().dtype(at::kFloat));
  with_dtype(x.scalar_type(), [&](auto in_tag) {
    using TI = decltype(in_tag);
    with_dtype(grad_out.scalar_type(), [&](auto out_tag) {
      using TO = decltype(out_tag);
      token_norm_bwd<TI, TO>(grad_out.data_ptr<TO>(), x.data_ptr<TI>(), scale.data_ptr<float>(),
                             mean.data_ptr<float>(), rstd.data_ptr<float>(), reverse,
                             addend ? addend->data_ptr<TI>() : nullptr, grad_x.data_ptr<TI>(), sums.data_ptr<float>(),
                             B, Tn, D);
    });
  });
  return {grad_x, sums[0], sums[1]};
}

// out = x + y with y's tokens in reverse order (out[b, t] = x[b, t] + y[b, T - 1 - t]), in x's dtype; without x,
// y reversed alone, cast to out's dtype. x, y, out: (B, T, D) contiguous.
void add_reversed(const std::optional<at::Tensor>& x, const at::Tensor& y, at::Tensor out) {
  check_rows(y, "y");
  check_rows(out, "out");
  TORCH_CHECK(out.sizes() == y.sizes(), "out must have the shape ", y.sizes(), ", got ", out.sizes());
  if (x) {
    check_rows(*x, "x");
    TORCH_CHECK(x->sizes() == y.sizes(), "x must have the shape ", y.sizes(), ", got ", x->sizes());
    TORCH_CHECK(x->scalar_type() == out.scalar_type(), "out must have x's dtype ", x->scalar_type());
  }
  with_dtype(out.scalar_type(), [&](auto out_tag) {
    using TX = decltype(out_tag);
    with_dtype(y.scalar_type(), [&](auto y_tag) {
      using TY = decltype(y_tag);
      add_reversed_rows<TX, TY>(x ? x->data_ptr<TX>() : nullptr, y.data_ptr<TY>(), out.data_ptr<TX>(), y.size(0),
                                y.size(1), y.size(2));
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vision_lstm_cpu, m) {
  m.def("gated_norm_forward(Tensor h, Tensor c, Tensor z, Tensor weight, Tensor? bias, Tensor skip, float eps, "
        "Tensor(a!) out, Tensor? z_bias=None) -> (Tensor, Tensor)");
  m.def("gated_norm_backward(Tensor grad_y, Tensor h, Tensor c, Tensor z, Tensor weight, Tensor? bias, Tensor skip, "
        "Tensor mean, Tensor rstd, Tensor? z_bias=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("conv_silu_forward(Tensor x, int height, int width, Tensor weight, Tensor? bias, Tensor(a!) out, "
        "Tensor? gate_w=None) -> Tensor");
  m.def("conv_silu_backward(Tensor grad_out, Tensor x, int height, int width, Tensor weight, Tensor? bias) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("conv_silu_backward_summed(Tensor grad_out, Tensor x, int height, int width, Tensor weight, Tensor? bias, "
        "Tensor? more, Tensor? gate_grad, Tensor? gate_w, Tensor? addend) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("token_norm_forward(Tensor x, Tensor weight, Tensor? bias, float eps, bool reverse, Tensor(a!) out) "
        "-> (Tensor, Tensor)");
  m.def("token_norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd, bool reverse, "
        "Tensor? addend=None) -> (Tensor, Tensor, Tensor)");
  m.def("add_reversed(Tensor? x, Tensor y, Tensor(a!) out) -> ()");
  m.def("column_sums(Tensor x) -> Tensor");
  m.def("fold_gates(Tensor w_i, Tensor w_f, Tensor w_q, Tensor w_k, Tensor w_v, Tensor b_q, Tensor b_k, Tensor b_v, "
        "Tensor w_m, Tensor b_m, Tensor b_i, Tensor b_f) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fold_gates_backward(Tensor grad_w_g, Tensor grad_gate_b, Tensor grad_gate_c, Tensor gate_v, Tensor w_i, "
        "Tensor w_f, Tensor w_q, Tensor w_k, Tensor w_v, Tensor b_q, Tensor b_k, Tensor b_v, Tensor w_m, Tensor b_m) "
        "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(vision_lstm_cpu, CPU, m) {
  m.impl("gated_norm_forward", &gated_norm_forward);
  m.impl("gated_norm_backward", &gated_norm_backward);
  m.impl("conv_silu_forward", &conv_silu_forward);
  m.impl("conv_silu_backward", &conv_silu_backward);
  m.impl("conv_silu_backward_summed", &conv_silu_backward_summed);
  m.impl("token_norm_forward", &token_norm_forward);
  m.impl("token_norm_backward", &token_norm_backward);
  m.impl("add_reversed", &add_reversed);
  m.impl("column_sums", &column_sums);
  m.impl("fold_gates", &fold_gates);
  m.impl("fold_gates_backward", &fold_gates_backward);
}

// Block-diagonal products of the ViL layer's q, k and v projections (the official code's LinearHeadwiseExpand):
//   y[n, j * bs + o] = sum_i W[j, o, i] x[n, j * bs + i] (+ bias)      for blocks of bs = 1, 2, 4, 8 or 16 channels,
// and their gradients. A product makes 2 bs FLOPs per element read, so it is bound by memory traffic, not arithmetic;
// PyTorch's routes (grouped convolutions, per-block matmuls) cost several times that traffic, and the cell wanted q,
// k and v head-major, so the layer also copied them there and their gradients back. Here one pass reads the inputs
// and writes the outputs in the layouts asked for: any (B, T, H, DH) view with a unit last stride, token-major
// (B, T, H * DH) memory or head-major (B, H, T, DH) memory alike.
//
// Vectorisation: kLanes channels per vector (16 with AVX-512, else 8; vec.h), whole blocks per vector (bs <= kLanes,
// kLanes % bs == 0 and DH % bs == 0, so a head's last, shorter vector holds whole blocks too; an 8-lane build refuses
// 16-channel blocks, and the layer takes PyTorch's route for them). For each shift s < bs, lane l of rotate_s(x)
// holds channel (l & ~(bs - 1)) | ((l + s) & (bs - 1)): the input i = (o + s) mod bs of the block row o = l mod bs. So
//   y = sum_s W_s * rotate_s(x)      with the weight table W_s[c] = W[c / bs, c % bs, (c % bs + s) % bs],
// and the weight gradient sum_n gy[n, c] x[n, rotate_s(c)] comes out in that same table form. Everything is summed in
// fp32 and rounded once to the output's dtype (bf16 or fp32).
//
// The weight gradient of the gates' thin product rides along: the layer folds the gates' weights on q and k into
// one (G, C) matrix A on c (G = 2 per head), and block_diag_outer can sum A's gradient g^T x (g: the gates'
// gradient (N, G)) beside q's weight gradient, from the row blocks of x it has in cache, where oneDNN's product read
// the whole of x again for 8 outputs (ViL-T, 8192 x 384 bf16, 2 threads of a Xeon, session 32, ad hoc: 570 + 460
// us as two passes, 800-840 us as one). Adding g A to the input gradient in block_diag_mm was slower than
// oneDNN's addmm_ (8 more multiply-adds per output vector: 1465-1772 us against 872 + 388; not kept).
//
// Compiled with mlstm_cpu.cpp by vision_lstm/fused.py; the layer keeps its PyTorch route without it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "vec.h"
#include "blockdiag.h"

namespace {

// A (B, T, H, DH) view with a unit last stride: row (b, t), head h starts at data + b * sb + t * st + h * sh.
template <typename T>
struct Rows {
  T* data;
  int64_t sb, st, sh;
  T* at(int64_t b, int64_t t, int64_t h) const { return data + b * sb + t * st + h * sh; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& x) {
  return {static_cast<T*>(x.data_ptr()), x.stride(0), x.stride(1), x.stride(2)};
}

// out = addend + sum_j blockdiag(W_j) in_j + bias for NIN inputs, vector by vector: the products summed in registers
// (fp32), then rounded once. Whole vectors take the constant count (for_vectors): a count the compiler cannot see sent
// each bf16 load through the stack. The addend (a gradient summed into, optional) may be out itself: each vector is
// read before it is written.
template <typename T, int BS, int NIN>
void block_mm(const Rows<const T>* ins, const float* const* tables, const float* bias, const Rows<const T>* addend,
              Rows<T> out, int64_t B, int64_t Tn, int64_t H, int64_t DH) {
  const int64_t C = H * DH;
  at::parallel_for(0, B * Tn, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Tn, t = r % Tn;
      for (int64_t h = 0; h < H; ++h) {
        const T* x[NIN];
        const float* w[NIN];
        for (int j = 0; j < NIN; ++j) x[j] = ins[j].at(b, t, h), w[j] = tables[j] + h * DH;
        const float* start = bias ? bias + h * DH : nullptr;
        const T* plus = addend ? addend->at(b, t, h) : nullptr;
        T* y = out.at(b, t, h);
        for_vectors(DH, [&](int64_t d0, auto count) {
          vfloat sum = start ? load(start + d0, count) : vfloat{};
          if (plus) sum += load(plus + d0, count);
#pragma GCC unroll 2
          for (int j = 0; j < NIN; ++j) sum += mm_vector<T, BS>(x[j] + d0, w[j] + d0, C, count, Shifts<BS>{});
          store(y + d0, sum, count);
        });
      }
    }
  });
}

// sum_n g[n, o0 + o] x[n, c] for o < 8 and the NV vectors of channels from (h, d0) (whole vectors, or one vector
// of count channels when NV is 0), over rows [r0, r1), added to sums[(o0 + o) * C + c]: 8 NV accumulators.
template <typename T, int NV_>
inline void gate_tile(const float* g, int64_t gates, int64_t o0, Rows<const T> x, int64_t r0, int64_t r1, int64_t Tn,
                      int64_t h, int64_t d0, int64_t count, int64_t c0, int64_t C, float* sums) {
  constexpr int NV = NV_ > 0 ? NV_ : 1;
  const int64_t n = NV_ > 0 ? kLanes : count;
  vfloat acc[NV][8] = {};
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / Tn, t = r % Tn;
    const T* px = x.at(b, t, h) + d0;
    const float* gr = g + r * gates + o0;
    vfloat xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = load(px + v * kLanes, n);
#pragma GCC unroll 8
    for (int o = 0; o < 8; ++o)
      for (int v = 0; v < NV; ++v) acc[v][o] += gr[o] * xv[v];
  }
  for (int o = 0; o < 8; ++o)
    for (int v = 0; v < NV; ++v) {
      float* p = sums + (o0 + o) * C + c0 + v * kLanes;
      store(p, load(p, n) + acc[v][o], n);
    }
}

// One pass of the weight gradient over rows [r0, r1) and the NV vectors of channels from (h, d0) on (whole vectors,
// or one vector of count channels when NV is 0): adds
// sum_n a[n, c] x[n, rotate_s(c)] to sums[s * C + c] and sum_n a[n, c] to sums[BS * C + c]. NV * (BS + 1)
// accumulators stay in registers over the rows.
template <typename T, int BS, int NV_, int... S>
inline void outer_tile(Rows<const T> a, Rows<const T> x, int64_t r0, int64_t r1, int64_t Tn, int64_t h, int64_t d0,
                       int64_t count, int64_t c0, int64_t C, float* sums, std::integer_sequence<int, S...>) {
  constexpr int NV = NV_ > 0 ? NV_ : 1;
  const int64_t n = NV_ > 0 ? kLanes : count;  // a constant for whole vectors: plain vector loads
  vfloat acc[NV][BS] = {};
  vfloat col[NV] = {};
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / Tn, t = r % Tn;
    const T* pa = a.at(b, t, h) + d0;
    const T* px = x.at(b, t, h) + d0;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const vfloat av = load(pa + v * kLanes, n), xv = load(px + v * kLanes, n);
      ((acc[v][S] += av * rotate<BS, S>(xv)), ...);
      col[v] += av;
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t c = c0 + v * kLanes;
    for (int s = 0; s < BS; ++s) store(sums + s * C + c, load(sums + s * C + c, n) + acc[v][s], n);
    store(sums + BS * C + c, load(sums + BS * C + c, n) + col[v], n);
  }
}

// The weight gradient of out = blockdiag(W) x for the output gradient a: the table sums (BS rows of C) and a's
// column sums (the bias gradient), in fp32, written to table (BS + 1 rows of C). With gates (a multiple of 8, else
// 0), also g^T x for the gates' gradient g (N, gates) fp32 rows, in the table's next `gates` rows.
template <typename T, int BS, int... S>
void block_outer(Rows<const T> a, Rows<const T> x, float* table, int64_t B, int64_t Tn, int64_t H, int64_t DH,
                 std::integer_sequence<int, S...> shifts, const float* gate_grad = nullptr, int64_t gates = 0) {
  constexpr int kTile = std::max(1, std::min(4, 16 / BS));  // vectors per pass: NV * (BS + 1) accumulators
  constexpr int64_t kRowBlock = 128;  // rows per block: the block's slices of a and x stay in L2 between passes
  const int64_t C = H * DH, N = B * Tn, threads = at::get_num_threads(), rows = BS + 1 + gates;
  std::vector<float> partial(threads * rows * C, 0.0f);
  // one contiguous range of rows per thread, each summed into its own partial table
  at::parallel_for(0, N, (N + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    float* sums = partial.data() + at::get_thread_num() * rows * C;
    float* gate_sums = sums + (BS + 1) * C;
    for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
      const int64_t r1 = std::min(end, r0 + kRowBlock);
      for (int64_t h = 0; h < H; ++h) {
        int64_t d0 = 0;
        for (; d0 + kTile * kLanes <= DH; d0 += kTile * kLanes)
          outer_tile<T, BS, kTile>(a, x, r0, r1, Tn, h, d0, kLanes, h * DH + d0, C, sums, shifts);
        for (; d0 + kLanes <= DH; d0 += kLanes)
          outer_tile<T, BS, 1>(a, x, r0, r1, Tn, h, d0, kLanes, h * DH + d0, C, sums, shifts);
        if (d0 < DH) outer_tile<T, BS, 0>(a, x, r0, r1, Tn, h, d0, DH - d0, h * DH + d0, C, sums, shifts);
        for (int64_t o0 = 0; o0 < gates; o0 += 8) {  // x's rows of this block again, from the cache
          int64_t e0 = 0;
          for (; e0 + 2 * kLanes <= DH; e0 += 2 * kLanes)
            gate_tile<T, 2>(gate_grad, gates, o0, x, r0, r1, Tn, h, e0, kLanes, h * DH + e0, C, gate_sums);
          for (; e0 + kLanes <= DH; e0 += kLanes)
            gate_tile<T, 1>(gate_grad, gates, o0, x, r0, r1, Tn, h, e0, kLanes, h * DH + e0, C, gate_sums);
          if (e0 < DH) gate_tile<T, 0>(gate_grad, gates, o0, x, r0, r1, Tn, h, e0, DH - e0, h * DH + e0, C, gate_sums);
        }
      }
    }
  });
  sum_partials(partial, threads, rows * C, table);
}

// The gates' gradient g (N, G) as fp32 rows of `padded` (G rounded up to 8) columns, zeros past G; checks its shape.
at::Tensor padded_gate_grad(const at::Tensor& g, int64_t N, int64_t padded) {
  TORCH_CHECK(g.device().is_cpu() && g.dim() == 2 && g.size(0) == N && g.size(1) >= 1,
              "gate_grad must be a (N, G) CPU tensor with N = B * T = ", N, " rows, got ", g.sizes());
  auto out = at::zeros({N, padded}, g.options().dtype(at::kFloat));
  out.narrow(1, 0, g.size(1)).copy_(g);
  return out;
}

int64_t padded_gates(int64_t G) { return (G + 7) / 8 * 8; }

void check_view(const at::Tensor& x, const at::Tensor& like, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              what, " must be a float32 or bfloat16 CPU tensor");
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), what, " must have the dtype ", like.scalar_type());
  TORCH_CHECK(x.dim() == 4 && x.sizes() == like.sizes(), what, " must be a (B, T, H, DH) view of shape ",
              like.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.stride(3) == 1, what, " must have a unit last stride");
}

// out = addend + sum_j blockdiag(weights[j]) inputs[j] (+ bias) for one or two inputs. inputs, out, addend:
// (B, T, H, DH) views with unit last strides, all float32 or all bfloat16; weights: (C / bs, bs, bs) each, one block
// size, any floating dtype (used in fp32); bias (C,) or None; addend or None, which may be out itself (out +=). For
// the transposed product (an input gradient) pass W.transpose(1, 2).
void block_diag_mm(at::TensorList inputs, at::TensorList weights, const std::optional<at::Tensor>& bias,
                   at::Tensor out, const std::optional<at::Tensor>& addend) {
  TORCH_CHECK(!inputs.empty() && inputs.size() <= 2 && inputs.size() == weights.size(),
              "block_diag_mm takes one or two inputs and one weight per input, got ", inputs.size(), " inputs and ",
              weights.size(), " weights");
  check_view(out, out, "out");
  const int64_t B = out.size(0), Tn = out.size(1), H = out.size(2), DH = out.size(3), C = H * DH;
  const int64_t bs = check_blocks(weights[0], C, DH);
  std::vector<std::vector<float>> tables;
  for (size_t j = 0; j < inputs.size(); ++j) {
    check_view(inputs[j], out, "each input");
    TORCH_CHECK(check_blocks(weights[j], C, DH) == bs, "all weights must have the same block size");
    tables.push_back(weight_table(weights[j]));
  }
  if (addend) check_view(*addend, out, "addend");
  at::Tensor bias32;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, "bias must have shape (", C, "), got ", bias->sizes());
    bias32 = bias->to(at::kFloat).contiguous();
  }
  const float* pb = bias ? bias32.data_ptr<float>() : nullptr;
  with_block_size(bs, [&](auto block) {
    constexpr int BS = decltype(block)::value;
    auto run = [&](auto zero) {
      using T = decltype(zero);
      // (with one input, block_mm<..., 1> reads only the first entry of each array)
      const Rows<const T> in[2] = {rows_of<const T>(inputs[0]), rows_of<const T>(inputs.back())};
      const float* w[2] = {tables[0].data(), tables.back().data()};
      const Rows<const T> plus = addend ? rows_of<const T>(*addend) : Rows<const T>{};
      const Rows<const T>* pp = addend ? &plus : nullptr;
      if (inputs.size() == 1)
        block_mm<T, BS, 1>(in, w, pb, pp, rows_of<T>(out), B, Tn, H, DH);
      else
        block_mm<T, BS, 2>(in, w, pb, pp, rows_of<T>(out), B, Tn, H, DH);
    };
    if (out.scalar_type() == at::kFloat)
      run(float{});
    else
      run(at::BFloat16{});
  });
}

// The weight and bias gradients of out = blockdiag(W) x + bias for the output gradient grad_out: returns
// (sum_n grad_out[n] x[n]^T per block: (C / bs, bs, bs), sum_n grad_out[n]: (C,), and with gate_grad (N, G) also
// sum_n gate_grad[n]^T x[n]: (G, C), else an empty tensor), all float32.
// grad_out, x: (B, T, H, DH) views with unit last strides, one dtype (float32 or bfloat16).
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_diag_outer(const at::Tensor& grad_out, const at::Tensor& x,
                                                                int64_t block_size,
                                                                const std::optional<at::Tensor>& gate_grad) {
  check_view(grad_out, grad_out, "grad_out");
  check_view(x, grad_out, "x");
  const int64_t B = x.size(0), Tn = x.size(1), H = x.size(2), DH = x.size(3), C = H * DH;
  check_block_size(block_size, DH);
  const int64_t bs = block_size, G = gate_grad ? gate_grad->size(-1) : 0, gates = padded_gates(G);
  const at::Tensor gg = gate_grad ? padded_gate_grad(*gate_grad, B * Tn, gates) : at::Tensor();
  const float* pgg = gate_grad ? gg.data_ptr<float>() : nullptr;
  std::vector<float> table((bs + 1 + gates) * C);
  with_block_size(bs, [&](auto block) {
    constexpr int BS = decltype(block)::value;
    if (x.scalar_type() == at::kFloat)
      block_outer<float, BS>(rows_of<const float>(grad_out), rows_of<const float>(x), table.data(), B, Tn, H, DH,
                             Shifts<BS>{}, pgg, gates);
    else
      block_outer<at::BFloat16, BS>(rows_of<const at::BFloat16>(grad_out), rows_of<const at::BFloat16>(x),
                                    table.data(), B, Tn, H, DH, Shifts<BS>{}, pgg, gates);
  });
  auto grad_weight = weight_from_table(table.data(), C, bs, x.options());
  auto grad_bias = at::empty({C}, x.options().dtype(at::kFloat));
  std::copy(table.begin() + bs * C, table.begin() + (bs + 1) * C, grad_bias.data_ptr<float>());
  auto grad_gate = at::empty({G, C}, x.options().dtype(at::kFloat));
  std::copy(table.begin() + (bs + 1) * C, table.begin() + (bs + 1 + G) * C, grad_gate.data_ptr<float>());
  return {grad_weight, grad_bias, grad_gate};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vision_lstm_cpu, m) {
  m.def("block_diag_mm(Tensor[] inputs, Tensor[] weights, Tensor? bias, Tensor(a!) out, Tensor? addend=None) "
        "-> ()");
  m.def("block_diag_outer(Tensor grad_out, Tensor x, int block_size, Tensor? gate_grad=None) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vision_lstm_cpu, CPU, m) {
  m.impl("block_diag_mm", &block_diag_mm);
  m.impl("block_diag_outer", &block_diag_outer);
}

// The per-head arithmetic of the layer's output path y = (HeadNorm(h) * (1 + w) + b + skip * c) * SiLU(z), shared
// by layer_cpu.cpp's gated_norm and the cell's inference kernels that end with it (mlstm_cpu.cpp): both run these
// same functions on the same fp32 values, so their y is the same bit for bit. Internal to the extension (an
// anonymous namespace in each source that includes it; include vec.h first).
#pragma once

#include <cmath>
#include <cstdint>

namespace {

// Mean and 1 / std of one head's DH values (two passes over the values: no cancellation in the variance).
template <typename T>
inline void head_stats(const T* h, int64_t DH, float eps, float& mean, float& rstd) {
  vfloat sum{};
  for_vectors(DH, [&](int64_t d0, auto count) { sum += load(h + d0, count); });
  mean = lane_sum(sum) / DH;
  vfloat squares{};
  for_vectors(DH, [&](int64_t d0, auto count) {
    const vfloat centred = load(h + d0, count) - mean;
    // lanes past count load as 0: keep them out of the sum
    squares += count == kLanes ? centred * centred
                               : (kLaneIndex < static_cast<int32_t>(count)) ? centred * centred : vfloat{};
  });
  rstd = 1.0f / std::sqrt(lane_sum(squares) / DH + eps);
}

// One head's y[d] = ((h[d] - mean) * rstd * scale[d] + bias[d] + skip[d] * c[d]) * SiLU(z[d] + z_bias[d]) for
// d < DH: every pointer at the head's first channel, scale = 1 + w; z_bias null: none (z has its bias already)
template <typename T>
inline void gated_head_out(const T* h, const T* c, const T* z, const float* scale, const float* bias,
                           const float* skip, float mean, float rstd, int64_t DH, T* y,
                           const float* z_bias = nullptr) {
  for_vectors(DH, [&](int64_t d0, auto count) {
    const vfloat normed = (load(h + d0, count) - mean) * rstd;
    const vfloat pre = normed * load(scale + d0, count) + load(bias + d0, count) +
                       load(skip + d0, count) * load(c + d0, count);
    const vfloat zv = z_bias ? load(z + d0, count) + load(z_bias + d0, count) : load(z + d0, count);
    store(y + d0, pre * zv * sigmoid(zv), count);
  });
}

}  // namespace

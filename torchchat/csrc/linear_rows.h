// A linear layer's weight as the row kernels of gemv_rows.h read it (LinearWeight), and multiply: the
// matrix-vector products that share one input, in one parallel region. Used by gemv.cpp (one product a
// call) and decode_layers.cpp (a block's products).
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>

#include "gemv_rows.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

namespace torchchat_cpu {

constexpr int64_t kGrainRows = 64;  // rows per thread at least: tiny matrices stay on one thread

// One weight, as its row kernel reads it.
struct LinearWeight {
  at::ScalarType dtype;                         // kFloat, kBFloat16, kChar (int8) or kByte (4-bit)
  const void *data;                             // (out, in), or (out, in / 2) packed
  const float *row_scale = nullptr;             // (out,) or none; int8 weights carry one
  const c10::Half *scales_and_mins = nullptr;   // 4-bit: (out, in / group_size, 2)
  int64_t group_size = 0;                       // 4-bit only
  int64_t n_out = 0, n_in = 0;

  // out[o] = row o of W times x (times its row scale) for o in [lo, hi). x as float32; xq, x16: as quantize_row
  // (4-bit) or quantize_row_int16 (int8) made it for this weight. Speed: one switch for the rows, not one a row
  // (a switch a row made SmolLM2-sized int4 products ~15% slower).
  void rows(int64_t lo, int64_t hi, const float *x, const QuantizedRow *xq, const Int16Row *x16, float *out) const {
    switch (dtype) {
      case at::kFloat:
        for (int64_t o = lo; o < hi; o++) out[o] = dot_row(x, static_cast<const float *>(data) + o * n_in, n_in);
        break;
      case at::kBFloat16:
        for (int64_t o = lo; o < hi; o++)
          out[o] = dot_row(x, static_cast<const c10::BFloat16 *>(data) + o * n_in, n_in);
        break;
      case at::kChar:
        for (int64_t o = lo; o < hi; o++)
          out[o] = dot_row_int8(*x16, static_cast<const int8_t *>(data) + o * n_in, n_in);
        break;
      default: {
        const int64_t row_bytes = n_in / 2, row_groups = n_in / group_size;
        for (int64_t o = lo; o < hi; o++)
          out[o] = dot_row_q4(*xq, static_cast<const uint8_t *>(data) + o * row_bytes,
                              scales_and_mins + o * row_groups * 2, n_in, group_size);
      }
    }
    if (row_scale)
      for (int64_t o = lo; o < hi; o++) out[o] *= row_scale[o];
  }
};

struct Product {
  const LinearWeight *weight;
  float *out;  // (weight->n_out,)
};

// out_i = W_i x for weights that share the input x (n_in values): every row of every product is split over
// torch's threads in ONE parallel region, and x is quantized once per 4-bit group size among them (and
// once to int16 if any weight is int8).
template <size_t N>
void multiply(const float *x, const std::array<Product, N> &products) {
  const int64_t n_in = products[0].weight->n_in;
  std::vector<std::pair<int64_t, QuantizedRow>> quantized;  // (group size, x quantized for it)
  quantized.reserve(N);  // no reallocation: xq points into it
  std::array<const QuantizedRow *, N> xq{};
  for (size_t i = 0; i < N; i++) {
    const int64_t g = products[i].weight->group_size;
    if (g == 0) continue;
    auto it = std::find_if(quantized.begin(), quantized.end(), [g](const auto &entry) { return entry.first == g; });
    if (it == quantized.end()) it = quantized.emplace(quantized.end(), g, quantize_row(x, n_in, g));
    xq[i] = &it->second;
  }
  const bool any_int8 = std::any_of(products.begin(), products.end(),
                                    [](const Product &p) { return p.weight->dtype == at::kChar; });
  const Int16Row x16 = any_int8 ? quantize_row_int16(x, n_in) : Int16Row{};
  int64_t total = 0;
  for (const Product &p : products) total += p.weight->n_out;
  at::parallel_for(0, total, kGrainRows, [&](int64_t begin, int64_t end) {
    int64_t first_row = 0;  // of products[i] in [0, total)
    for (size_t i = 0; i < N; i++) {
      const LinearWeight &w = *products[i].weight;
      const int64_t lo = std::max(begin, first_row) - first_row, hi = std::min(end, first_row + w.n_out) - first_row;
      if (lo < hi) w.rows(lo, hi, x, xq[i], &x16, products[i].out);
      first_row += w.n_out;
    }
  });
}

}  // namespace torchchat_cpu

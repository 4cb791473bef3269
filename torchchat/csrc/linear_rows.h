// A linear layer's weight as the row kernels of gemv_rows.h read it (LinearWeight), and multiply: the products of
// R rows of x by the weights that share that input, in one parallel region. Used by gemv.cpp (one product a call)
// and decode_layers.cpp (a block's products, for every sequence of the batch).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include "gemv_rows.h"
#include "work_pool.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

namespace torchchat_cpu {

// Weight bytes a chunk of rows reads at least (work_pool.h: chunks are claimed one at a time). Small enough that a
// SmolLM2 projection is 10-70 chunks (threads that run share it evenly, one that stalls holds up little), large
// enough that the claim (a compare-and-swap, ~20 ns) is a small part of it; at least kMinChunkRows rows.
constexpr int64_t kChunkBytes = 32 * 1024, kMinChunkRows = 8, kMaxChunksPerRegion = 256;

// f<2>(r) for r = 0, 2, 4, ..., then f<1>(n - 1) if n is odd: the x rows of a weight row, as many at a time as
// the row kernels take. f: a lambda [&]<int R>(int64_t r).
template <typename F>
inline void in_pairs(int64_t n, F &&f) {
  int64_t r = 0;
  for (; r + 2 <= n; r += 2) f.template operator()<2>(r);
  if (r < n) f.template operator()<1>(r);
}

// The low 8 bytes as 8 float32 values.
inline __m256 widen8(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }

// R rows of x in each form the row kernels read.
struct XRows {
  int64_t n;                       // R
  const float *x;                  // row r at x + r * stride, float32
  int64_t stride;
  const QuantizedRow *xq;          // (R,) as quantize_row made them for the weight's BlockForm (4-bit)
  const Int16Row *x16;             // (R,) as quantize_row_int16 made them (int8, either form)
};

// One weight, as its row kernel reads it.
struct LinearWeight {
  at::ScalarType dtype;                         // kFloat, kBFloat16, kChar (int8) or kByte (4-bit)
  const void *data;                             // (out, in), or (out, in / 2) packed
  const float *row_scale = nullptr;             // (out,) or none; int8 weights carry it or block_scales
  const c10::Half *scales_and_mins = nullptr;   // 4-bit: (out, in / group_size, 2)
  int64_t group_size = 0;                       // 4-bit only
  int64_t n_out = 0, n_in = 0;
  const c10::Half *block_scales = nullptr;      // int8 blocks (llama.cpp's Q8_0): (out, in / 32)

  // Bytes of one weight row and its scales.
  int64_t row_bytes() const {
    switch (dtype) {
      case at::kFloat: return 4 * n_in;
      case at::kBFloat16: return 2 * n_in;
      case at::kChar: return n_in + (block_scales ? n_in / 16 : 4);
      default: return n_in / 2 + 4 * (n_in / group_size);
    }
  }

  // How the weight reads x in int8 blocks (quantize_row), if it does: 4-bit weights.
  BlockForm block_form() const {
    if (dtype == at::kByte) return {group_size, group_size == 32};
    return {};
  }

  // Does the weight read x in int16 with a scale a row (quantize_row_int16)? int8 weights, with row scales or
  // block scales.
  bool reads_int16() const { return dtype == at::kChar; }

  // Rows [lo, hi) of W in float32, their row scales applied: (hi - lo, n_in) at out. A prompt's GEMM operand
  // (prompt_linear.cpp) and dequantize_int4; a float32 weight is read where it is instead (float_data).
  void float_rows(int64_t lo, int64_t hi, float *out) const {
    for (int64_t o = lo; o < hi; o++) {
      float *row = out + (o - lo) * n_in;
      switch (dtype) {
        case at::kFloat:
          std::copy_n(static_cast<const float *>(data) + o * n_in, n_in, row);
          break;
        case at::kBFloat16: {
          const uint16_t *w = static_cast<const uint16_t *>(data) + o * n_in;
          for (int64_t i = 0; i < n_in; i++) {
            const uint32_t bits = static_cast<uint32_t>(w[i]) << 16;  // bfloat16 is float32's top half
            std::memcpy(row + i, &bits, 4);
          }
          break;
        }
        case at::kChar: {
          const int8_t *w = static_cast<const int8_t *>(data) + o * n_in;
          if (block_scales) {  // as quantize.dequantize_int8_blocks: q * d for each block of 32
            for (int64_t i = 0; i < n_in; i++)
              row[i] = static_cast<float>(w[i]) * static_cast<float>(block_scales[o * (n_in / 32) + i / 32]);
          } else {
            for (int64_t i = 0; i < n_in; i++) row[i] = static_cast<float>(w[i]) * (row_scale ? row_scale[o] : 1.0f);
          }
          break;
        }
        default: {  // 4-bit: q * scale + min, as one fused multiply-add
          const uint8_t *q = static_cast<const uint8_t *>(data) + o * (n_in / 2);
          const c10::Half *sm = scales_and_mins + o * (n_in / group_size) * 2;
          for (int64_t b = 0; b < n_in / 32; b++) {
            const int64_t g = 32 * b / group_size;
            const __m256 scale = _mm256_set1_ps(_cvtsh_ss(sm[2 * g].x)), min = _mm256_set1_ps(_cvtsh_ss(sm[2 * g + 1].x));
            __m128i lo4, hi4;
            unpack_block(q, b, lo4, hi4);
            float *w = row + 32 * b;
            _mm256_storeu_ps(w, _mm256_fmadd_ps(widen8(lo4), scale, min));                         // q[0 .. 8)
            _mm256_storeu_ps(w + 8, _mm256_fmadd_ps(widen8(_mm_srli_si128(lo4, 8)), scale, min));  // q[8 .. 16)
            _mm256_storeu_ps(w + 16, _mm256_fmadd_ps(widen8(hi4), scale, min));                    // q[16 .. 24)
            _mm256_storeu_ps(w + 24, _mm256_fmadd_ps(widen8(_mm_srli_si128(hi4, 8)), scale, min));  // q[24 .. 32)
          }
        }
      }
    }
  }

  // Row o of a float32 weight where it is stored (row scales not applied), or nullptr for other formats.
  const float *float_data() const { return dtype == at::kFloat ? static_cast<const float *>(data) : nullptr; }

  // out[r * out_stride + o] = row o of W times x row r (times its row scale) for o in [lo, hi), every r. Each
  // weight row is read from memory once and multiplied by every x row while it is in L1. Speed: one switch for
  // the rows, not one a row (a switch a row made SmolLM2-sized int4 products ~15% slower).
  void rows(int64_t lo, int64_t hi, const XRows &x, float *out, int64_t out_stride) const {
    switch (dtype) {
      case at::kFloat:
        for (int64_t o = lo; o < hi; o++)
          in_pairs(x.n, [&]<int R>(int64_t r) {
            dot_rows<R>(x.x + r * x.stride, x.stride, static_cast<const float *>(data) + o * n_in, n_in,
                        out + r * out_stride + o, out_stride);
          });
        break;
      case at::kBFloat16:
        for (int64_t o = lo; o < hi; o++)
          in_pairs(x.n, [&]<int R>(int64_t r) {
            dot_rows<R>(x.x + r * x.stride, x.stride, static_cast<const c10::BFloat16 *>(data) + o * n_in, n_in,
                        out + r * out_stride + o, out_stride);
          });
        break;
      case at::kChar:
        if (block_scales) {
          for (int64_t o = lo; o < hi; o++)
            in_pairs(x.n, [&]<int R>(int64_t r) {
              dot_rows_q8<R>(x.x16 + r, static_cast<const int8_t *>(data) + o * n_in, block_scales + o * (n_in / 32),
                             n_in, out + r * out_stride + o, out_stride);
            });
          break;
        }
        for (int64_t o = lo; o < hi; o++)
          in_pairs(x.n, [&]<int R>(int64_t r) {
            dot_rows_int8<R>(x.x16 + r, static_cast<const int8_t *>(data) + o * n_in, n_in, out + r * out_stride + o,
                             out_stride);
          });
        break;
      default: {
        const int64_t row_bytes = n_in / 2, row_groups = n_in / group_size;
        for (int64_t o = lo; o < hi; o++)
          in_pairs(x.n, [&]<int R>(int64_t r) {
            dot_rows_q4<R>(x.xq + r, static_cast<const uint8_t *>(data) + o * row_bytes,
                           scales_and_mins + o * row_groups * 2, n_in, group_size, out + r * out_stride + o,
                           out_stride);
          });
      }
    }
    if (row_scale)
      for (int64_t r = 0; r < x.n; r++)
        for (int64_t o = lo; o < hi; o++) out[r * out_stride + o] *= row_scale[o];
  }
};

// A linear layer's operands as the ops take them ((weight, aux, group_size): torchchat.cpu's gemv_operands), checked;
// op and name say whose, in the error.
inline LinearWeight linear_weight(const std::optional<at::Tensor> &weight, const std::optional<at::Tensor> &aux,
                                  int64_t group_size, const char *op, const char *name) {
  TORCH_CHECK(weight.has_value() && weight->dim() == 2 && weight->is_contiguous() && weight->device().is_cpu(),
              op, ": ", name, " must be a contiguous 2-D CPU tensor");
  LinearWeight w{weight->scalar_type(), weight->data_ptr()};
  w.n_out = weight->size(0);
  w.n_in = weight->size(1);
  switch (w.dtype) {
    case at::kFloat:
    case at::kBFloat16:
      TORCH_CHECK(!aux.has_value() && group_size == 0, op, ": ", name, " is a float weight: no aux");
      break;
    case at::kChar:
      if (group_size == 32) {
        TORCH_CHECK(aux.has_value() && aux->scalar_type() == at::kHalf && aux->is_contiguous() &&
                        w.n_in % 32 == 0 && aux->dim() == 2 && aux->size(0) == w.n_out && aux->size(1) == w.n_in / 32,
                    "torchchat::decode_layers: int8 ", name, " in blocks of 32 needs (", w.n_out, ", ", w.n_in / 32,
                    ") float16 block scales");
        w.block_scales = aux->data_ptr<c10::Half>();
        break;
      }
      TORCH_CHECK(aux.has_value() && aux->scalar_type() == at::kFloat && aux->is_contiguous() &&
                      aux->numel() == w.n_out && group_size == 0,
                  "torchchat::decode_layers: int8 ", name, " needs (", w.n_out,
                  ",) float32 row scales (group size 0) or block scales (group size 32)");
      w.row_scale = aux->data_ptr<float>();
      break;
    case at::kByte:
      w.n_in *= 2;
      TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && w.n_in % group_size == 0,
                  "torchchat::decode_layers: 4-bit ", name, ": group size (", group_size,
                  ") must be a multiple of 32 that divides ", w.n_in);
      TORCH_CHECK(aux.has_value() && aux->scalar_type() == at::kHalf && aux->is_contiguous() &&
                      aux->numel() == w.n_out * (w.n_in / group_size) * 2,
                  "torchchat::decode_layers: 4-bit ", name, " needs (", w.n_out, ", ", w.n_in / group_size,
                  ", 2) float16 scales and mins");
      w.scales_and_mins = aux->data_ptr<c10::Half>();
      w.group_size = group_size;
      break;
    default:
      TORCH_CHECK(false, op, ": ", name, " has dtype ", w.dtype,
                  ": float32, bfloat16, int8 or 4-bit packed uint8 only");
  }
  return w;
}

struct Product {
  const LinearWeight *weight;
  float *out;          // row r's weight->n_out values at out + r * out_stride
  int64_t out_stride;
};

// out_i = x W_i^T for R rows of x (row r at x + r * x_stride, n_in values) and weights that share them: every row
// of every product is split over the threads in ONE parallel region (chunks of rows: work_pool.h), and each x row
// is quantized once per BlockForm among them (4-bit group sizes), and once to int16 if any weight is int8 (either
// form).
// A row's outputs are bit-identical whatever R (gemv_rows.h), and do not depend on the thread count (a thread
// computes whole outputs).
// Whose threads split the rows: the kernels' pool (work_pool.h), or torch's (OpenMP). The pool is for calls that
// own a whole step (decode_layers, a one-row gemv): beside torch's own ops, whose OpenMP threads spin ~30 us at
// each wait (GOMP_SPINCOUNT), the pool's workers find the cores taken and the caller does every chunk (a 5-row
// gemv between a forward's torch ops ran 1.7x slower on the pool than on OpenMP, and put the pool in solo mode).
enum class RowThreads { kPool, kTorch };

template <size_t N>
void multiply(const float *x, int64_t n_rows, int64_t x_stride, const std::array<Product, N> &products,
              RowThreads threads = RowThreads::kPool) {
  const int64_t n_in = products[0].weight->n_in;
  std::vector<std::pair<BlockForm, std::vector<QuantizedRow>>> quantized;  // (form, x's rows quantized for it)
  quantized.reserve(N);  // no reallocation: xq points into it
  std::array<const QuantizedRow *, N> xq{};
  for (size_t i = 0; i < N; i++) {
    const BlockForm form = products[i].weight->block_form();
    if (form.group_size == 0) continue;
    auto it = std::find_if(quantized.begin(), quantized.end(),
                           [form](const auto &entry) { return entry.first == form; });
    if (it == quantized.end()) {
      std::vector<QuantizedRow> rows;
      rows.reserve(n_rows);
      for (int64_t r = 0; r < n_rows; r++) rows.push_back(quantize_row(x + r * x_stride, n_in, form));
      it = quantized.emplace(quantized.end(), form, std::move(rows));
    }
    xq[i] = it->second.data();
  }
  const bool any_int16 = std::any_of(products.begin(), products.end(),
                                     [](const Product &p) { return p.weight->reads_int16(); });
  std::vector<Int16Row> x16;
  if (any_int16)
    for (int64_t r = 0; r < n_rows; r++) x16.push_back(quantize_row_int16(x + r * x_stride, n_in));
  int64_t total = 0, row_bytes = 1;
  for (const Product &p : products) total += p.weight->n_out, row_bytes = std::max(row_bytes, p.weight->row_bytes());
  // at least kChunkBytes a chunk, and at most kMaxChunksPerRegion chunks (a claim costs ~20 ns)
  const int64_t chunk_rows = std::max({kMinChunkRows, kChunkBytes / row_bytes, total / kMaxChunksPerRegion});
  auto rows = [&](int64_t begin, int64_t end) {
    int64_t first_row = 0;  // of products[i] in [0, total)
    for (size_t i = 0; i < N; i++) {
      const LinearWeight &w = *products[i].weight;
      const int64_t lo = std::max(begin, first_row) - first_row, hi = std::min(end, first_row + w.n_out) - first_row;
      if (lo < hi)
        w.rows(lo, hi, XRows{n_rows, x, x_stride, xq[i], x16.data()}, products[i].out, products[i].out_stride);
      first_row += w.n_out;
    }
  };
  if (threads == RowThreads::kTorch)
    at::parallel_for(0, total, chunk_rows, rows);  // static blocks of at least chunk_rows rows
  else
    parallel_chunks(total, chunk_rows, rows);
}

}  // namespace torchchat_cpu

// One weight row times R rows of x (R = 1 or 2: the register budget), for each weight format: dot_rows (float32,
// bfloat16); with the activations in int16 with a scale a row from quantize_row_int16: dot_rows_int8 (int8 with a
// scale a row) and dot_rows_q8 (int8 with a float16 scale a block of 32, llama.cpp's Q8_0); with the activations in
// int8 blocks of 32 from quantize_row: dot_rows_q4 (4-bit weights, quantize.Int4Linear's layout).
// Shared by the ops of gemv.cpp (one matrix a call) and decode_layers.cpp (a model's blocks a call).
// Each computes one output value per x row; callers split the weight rows over threads (linear_rows.h).
//
// Batches: a row of x gets the same arithmetic whatever R and whatever rows sit beside it (its own accumulators,
// updated in the same order), so every output is bit-identical to the one-row call on that row; the weight is
// loaded (and converted, widened or unpacked) once for the R rows.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include "avx2_reduce.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace torchchat_cpu {

using torchchat_avx2::hmax;
using torchchat_avx2::hsum;
using torchchat_avx2::load8;

// x rows r in [0, R) at x + r * x_stride: out[r * out_stride] = x_r . row.
template <int R, typename T>
inline void dot_rows(const float *x, int64_t x_stride, const T *row, int64_t n_in, float *out, int64_t out_stride) {
  // 4 independent accumulators a row hide the FMA latency; one weight row after another, so a thread's rows are
  // one sequential stream for the hardware prefetcher (short rows read as 4 interleaved streams measured at half
  // the rate for SmolLM2's 576 columns).
  __m256 acc[R][4];
  for (int r = 0; r < R; r++)
    for (int j = 0; j < 4; j++) acc[r][j] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n_in; i += 32) {
    const __m256 w0 = load8(row + i), w1 = load8(row + i + 8), w2 = load8(row + i + 16), w3 = load8(row + i + 24);
    for (int r = 0; r < R; r++) {
      const float *xr = x + r * x_stride + i;
      acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[r][1]);
      acc[r][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[r][2]);
      acc[r][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[r][3]);
    }
  }
  for (; i + 8 <= n_in; i += 8) {
    const __m256 w = load8(row + i);
    for (int r = 0; r < R; r++) acc[r][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * x_stride + i), acc[r][0]);
  }
  for (int r = 0; r < R; r++) {
    const float *xr = x + r * x_stride;
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
    for (int64_t k = i; k < n_in; k++) sum += xr[k] * static_cast<float>(row[k]);
    out[r * out_stride] = sum;
  }
}

// One x row: dot_rows<1>.
template <typename T>
inline float dot_row(const float *x, const T *row, int64_t n_in) {
  float out;
  dot_rows<1>(x, 0, row, n_in, &out, 0);
  return out;
}

// ----- int8 rows (quantize.Int8Linear), with the activation in int16 -----
//
// Why: converting each int8 weight to float32 (widen, convert, multiply-add: 4 instructions for 8 weights)
// made int8 rows compute-bound at ~11 G weights/s on 2 threads, below the memory's rate. Here x is rounded
// once per call to int16 with one scale (x ~ xq * d, d = max|x| / 32767: an error below 1/65534 of max|x|
// per value, ~500x finer than bfloat16), and 16 weights are widened to int16 and multiply-added with
// madd (2 instructions); products are summed as int32 over 256 inputs at a time (at most 16 pairs of
// 127 * 32767 a lane: no overflow) and converted to float once per 256.

struct Int16Row {
  std::vector<int16_t> q;  // (in,) round(x / d)
  float scale = 0.0f;      // d
};

inline Int16Row quantize_row_int16(const float *x, int64_t n_in) {
  Int16Row r{std::vector<int16_t>(n_in)};
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n_in; i += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  float amax = hmax(vmax);
  for (; i < n_in; i++) amax = std::max(amax, std::abs(x[i]));
  r.scale = amax / 32767.0f;
  const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  for (i = 0; i + 16 <= n_in; i += 16) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vinv));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // undo packs' lane interleave
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(r.q.data() + i), packed);
  }
  for (; i < n_in; i++) r.q[i] = static_cast<int16_t>(std::nearbyint(x[i] * inv));
  return r;
}

// For x rows r in [0, R): out[r * out_stride] = sum over i of row[i] * x_r[i] for an int8 row (times x_r's
// scale; the row's own scale is the caller's). x: R consecutive Int16Rows.
template <int R>
inline void dot_rows_int8(const Int16Row *x, const int8_t *row, int64_t n_in, float *out, int64_t out_stride) {
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  int64_t i = 0;
  while (i + 16 <= n_in) {
    const int64_t chunk_end = std::min(n_in, i + 256);
    __m256i sum0[R], sum1[R];
    for (int r = 0; r < R; r++) sum0[r] = sum1[r] = _mm256_setzero_si256();
    for (; i + 32 <= chunk_end; i += 32) {
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(row + i)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(row + i + 16)));
      for (int r = 0; r < R; r++) {
        const auto *xq = reinterpret_cast<const __m256i *>(x[r].q.data() + i);
        sum0[r] = _mm256_add_epi32(sum0[r], _mm256_madd_epi16(w0, _mm256_loadu_si256(xq)));
        sum1[r] = _mm256_add_epi32(sum1[r], _mm256_madd_epi16(w1, _mm256_loadu_si256(xq + 1)));
      }
    }
    for (; i + 16 <= chunk_end; i += 16) {
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(row + i)));
      for (int r = 0; r < R; r++)
        sum0[r] = _mm256_add_epi32(
            sum0[r], _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x[r].q.data() + i))));
    }
    for (int r = 0; r < R; r++) acc[r] = _mm256_add_ps(acc[r], _mm256_cvtepi32_ps(_mm256_add_epi32(sum0[r], sum1[r])));
  }
  for (int r = 0; r < R; r++) {
    const int16_t *xq = x[r].q.data();
    float sum = hsum(acc[r]);
    for (int64_t k = i; k < n_in; k++) sum += static_cast<float>(row[k]) * static_cast<float>(xq[k]);
    out[r * out_stride] = sum * x[r].scale;
  }
}

// One x row: dot_rows_int8<1>.
inline float dot_row_int8(const Int16Row &x, const int8_t *row, int64_t n_in) {
  float out;
  dot_rows_int8<1>(&x, row, n_in, &out, 0);
  return out;
}

// ----- int4 rows (torch.ops.torchchat.gemv_int4, quantize.Int4Linear) -----
//
// W[o, i] = q[o, i] * scale[o, g] + min[o, g] for g = i / group_size, q in [0, 15] (llama.cpp's Q4_1).
// packed: (out, in / 2) uint8; within each block of 32 weights, byte j holds q[j] in its low half and
// q[j + 16] in its high half. scales_and_mins: (out, in / group_size, 2) float16. group_size: a multiple
// of 32 that divides in.
//
// Why integer dot products: unpacking 4-bit weights to float32 costs ~1 cycle a weight on AVX2, far
// slower than memory delivers them. As llama.cpp does, x is quantized once per call to int8 in blocks
// of 32 (x ~ xq * d, d = max|x| / 127) and each block's q . xq is two integer instructions
// (maddubs, madd) for 32 weights; the min term uses the sums of the quantized x, so that the result is
// exactly W . (xq * d): the rounding error of x meets the weights themselves, not their 4-bit codes
// (which all have the same sign), and stays ~0.5% (exact sums of x measured ~2% on random weights).
// y[o] = sum over blocks b of scale[o, g(b)] * d[b] * (q . xq)_b + sum over groups g of min[o, g] * sum(xq_g * d).
// group_size 32 (the default, llama.cpp's) takes dot_rows_group32, eight blocks at a time; others, dot_row_int4.

// The 32 4-bit codes of block b (16 bytes at q + 16 b): lo = q[0 .. 16), hi = q[16 .. 32), one byte each.
inline void unpack_block(const uint8_t *q, int64_t b, __m128i &lo, __m128i &hi) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i *>(q + 16 * b));
  lo = _mm_and_si128(bytes, low4);
  hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
}

constexpr int64_t kChunkBlocks = 8;      // blocks that dot_chunk reduces together
constexpr int64_t kPrefetchBytes = 2048;  // how far ahead dot_rows_group32 fetches

// How a weight reads x in int8 blocks of 32: the blocks' order, and the groups whose sums of x it needs (a 4-bit
// weight's min terms). multiply quantizes x once for every weight of the same form.
struct BlockForm {
  int64_t group_size = 0;  // 0: the weight does not read x in int8 blocks (float, int8)
  bool paired = false;     // blocks 2p and 2p + 1 interleaved by halves (dot_chunk), or in order
  bool operator==(const BlockForm &) const = default;
};

struct QuantizedRow {
  std::vector<int8_t> q;           // paired: in the order dot_chunk reads it; else (in,) in order; zeros up to a
                                   // whole chunk. x / d, rounded.
  std::vector<float> block_scale;  // (in / 32,) d, zeros up to a whole chunk
  std::vector<float> group_sum;    // (in / group_size,) sums of xq * d, zeros up to a whole chunk
};

inline QuantizedRow quantize_row(const float *x, int64_t n_in, BlockForm form) {
  const int64_t n_blocks = n_in / 32, padded = (n_blocks + kChunkBlocks - 1) / kChunkBlocks * kChunkBlocks;
  const int64_t group_size = form.group_size;
  const bool paired = form.paired;
  QuantizedRow r{std::vector<int8_t>(32 * padded), std::vector<float>(padded),
                 std::vector<float>(std::max(n_in / group_size, padded))};
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i lane_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo packs' per-lane interleave
  for (int64_t b = 0; b < n_blocks; b++) {
    const float *xb = x + 32 * b;
    const __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
                 v3 = _mm256_loadu_ps(xb + 24);
    const __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, abs_mask), _mm256_and_ps(v1, abs_mask)),
                                      _mm256_max_ps(_mm256_and_ps(v2, abs_mask), _mm256_and_ps(v3, abs_mask)));
    const float d = hmax(amax) / 127.0f;
    const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv)),
                  i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    const __m256i packed = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)), lane_order);  // xq[0 .. 32)
    if (paired) {
      // Blocks 2p and 2p + 1 as [first halves of both | second halves of both], as dot_chunk unpacks weights.
      int8_t *pair = r.q.data() + 64 * (b / 2) + 16 * (b & 1);
      _mm_storeu_si128(reinterpret_cast<__m128i *>(pair), _mm256_castsi256_si128(packed));
      _mm_storeu_si128(reinterpret_cast<__m128i *>(pair + 32), _mm256_extracti128_si256(packed, 1));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(r.q.data() + 32 * b), packed);
    }
    r.block_scale[b] = d;
    const __m256i block_sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    r.group_sum[32 * b / group_size] += d * hsum(_mm256_cvtepi32_ps(block_sum));  // values in [-127, 127]: exact
  }
  return r;
}

// Lanes [0, n) set: a mask for _mm256_maskload_epi32 (n <= 0: none, n >= 8: all).
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Blocks [b0, b0 + n) of a row with group_size 32 (n <= 8): one scale and min per block, 16 bytes of
// codes per block, times R rows of x (consecutive QuantizedRows). Adds each x row's chunk terms into its acc.
// Why: a block is 32 multiply-adds in two integer instructions, so handling its scale alone (two float16
// conversions, a broadcast, a float multiply-add) cost more than its dot product: here two blocks share
// each integer instruction, and the chunk's eight block sums are reduced together (three hadds) and
// scaled by one vector of scales (measured 2x faster from cache). A partial chunk (a row's last) reads
// through masks: nothing past the row, zeros for the missing blocks. The codes are unpacked, and the scales
// converted, once for the R rows.
template <bool PARTIAL, int R>
inline void dot_chunk(const QuantizedRow *x, const uint8_t *q, const c10::Half *sm, int64_t b0, int64_t n,
                      __m256 *acc) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256i pair_sums[R][4];
  for (int p = 0; p < 4; p++) {
    if (PARTIAL && 2 * p >= n) {
      for (int r = 0; r < R; r++) pair_sums[r][p] = _mm256_setzero_si256();
      continue;
    }
    const auto *codes = reinterpret_cast<const int *>(q + 16 * b0 + 32 * p);  // blocks 2p and 2p + 1
    const __m256i bytes = PARTIAL ? _mm256_maskload_epi32(codes, first_lanes(4 * (n - 2 * p)))
                                  : _mm256_loadu_si256(reinterpret_cast<const __m256i *>(codes));
    const __m256i first = _mm256_and_si256(bytes, low4);                         // q[0 .. 16) of both blocks
    const __m256i second = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);  // q[16 .. 32) of both
    for (int r = 0; r < R; r++) {
      const int8_t *xp = x[r].q.data() + 32 * b0;
      const __m256i x_first = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xp + 64 * p));
      const __m256i x_second = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xp + 64 * p + 32));
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(first, x_first),
                                             _mm256_maddubs_epi16(second, x_second));  // |.| <= 7620
      pair_sums[r][p] = _mm256_madd_epi16(pairs, ones);  // lanes 0-3: block 2p's partial sums, 4-7: 2p + 1's
    }
  }
  // 8 (scale, min) float16 pairs, one 32-bit lane each -> scales in the low 128 bits, mins in the high
  const __m256i deinterleave = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                                0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  const auto *scale_min_pairs = reinterpret_cast<const int *>(sm + 2 * b0);
  const __m256i raw = PARTIAL ? _mm256_maskload_epi32(scale_min_pairs, first_lanes(n))
                              : _mm256_loadu_si256(reinterpret_cast<const __m256i *>(scale_min_pairs));
  const __m256i halves = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(raw, deinterleave), 0xD8);  // s0-7 m0-7
  const __m256 scales = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
  const __m256 mins = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
  for (int r = 0; r < R; r++) {
    // the block sums, lanes in block order 0 2 4 6 1 3 5 7
    const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(pair_sums[r][0], pair_sums[r][1]),
                                           _mm256_hadd_epi32(pair_sums[r][2], pair_sums[r][3]));
    const __m256 dots =
        _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    acc[r] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(x[r].group_sum.data() + b0), acc[r]);
    acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(scales, _mm256_loadu_ps(x[r].block_scale.data() + b0)), dots, acc[r]);
  }
}

// One row of a group-size-32 weight times R rows of x, chunk by chunk: out[r * out_stride] = x_r . row.
template <int R>
inline void dot_rows_group32(const QuantizedRow *x, const uint8_t *q, const c10::Half *sm, int64_t n_in, float *out,
                             int64_t out_stride) {
  const int64_t n_blocks = n_in / 32, whole = n_blocks / kChunkBlocks * kChunkBlocks;
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < whole; b += kChunkBlocks) {
    // Speed: fetch ahead (later rows, once this one ends), so a small matrix does not wait on memory
    // while the hardware prefetcher warms up (SmolLM2's 210 int4 matrices: ~10% faster, measured).
    _mm_prefetch(reinterpret_cast<const char *>(q + 16 * b + kPrefetchBytes), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char *>(q + 16 * b + kPrefetchBytes + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char *>(sm + 2 * b) + kPrefetchBytes, _MM_HINT_T0);
    dot_chunk<false, R>(x, q, sm, b, kChunkBlocks, acc);
  }
  if (whole < n_blocks) dot_chunk<true, R>(x, q, sm, whole, n_blocks - whole, acc);
  for (int r = 0; r < R; r++) out[r * out_stride] = hsum(acc[r]);
}

// Any group size (a multiple of 32): block by block.
inline float dot_row_int4(const QuantizedRow &x, const uint8_t *q, const c10::Half *sm, int64_t n_in, int64_t group_size) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t *xq = x.q.data();
  const float *block_scale = x.block_scale.data(), *group_sum = x.group_sum.data();
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;  // two chains: even and odd blocks
  float min_terms = 0.0f;
  for (int64_t g = 0, b = 0; g < n_in / group_size; g++) {
    const float scale = _cvtsh_ss(sm[2 * g].x);
    min_terms += _cvtsh_ss(sm[2 * g + 1].x) * group_sum[g];
    for (const int64_t group_end = b + group_size / 32; b < group_end; b++) {
      __m128i lo, hi;
      unpack_block(q, b, lo, hi);
      const __m256i nibbles = _mm256_set_m128i(hi, lo);  // q[0 .. 32) in order
      const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xq + 32 * b));
      const __m256i pairs = _mm256_maddubs_epi16(nibbles, xb);  // 16 x int16: q0 x0 + q1 x1, ... (|.| <= 3810)
      const __m256 dot8 = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));  // 8 partial sums
      const __m256 block = _mm256_set1_ps(scale * block_scale[b]);
      if (b & 1)
        acc1 = _mm256_fmadd_ps(block, dot8, acc1);
      else
        acc0 = _mm256_fmadd_ps(block, dot8, acc0);
    }
  }
  return hsum(_mm256_add_ps(acc0, acc1)) + min_terms;
}

// One row of a 4-bit weight of any group size times R rows of x, each quantized by quantize_row for that group
// size: out[r * out_stride] = x_r . row.
template <int R>
inline void dot_rows_q4(const QuantizedRow *x, const uint8_t *q, const c10::Half *sm, int64_t n_in,
                        int64_t group_size, float *out, int64_t out_stride) {
  if (group_size == 32) {
    dot_rows_group32<R>(x, q, sm, n_in, out, out_stride);
    return;
  }
  for (int r = 0; r < R; r++) out[r * out_stride] = dot_row_int4(x[r], q, sm, n_in, group_size);
}

// ----- int8 blocks (quantize.Int8Linear's block form, llama.cpp's Q8_0) -----
//
// W[o, i] = w[o, i] * d[o, i / 32]: w (out, in) int8, d (out, in / 32) float16 (a Q8_0 block's d and qs[32]).
// x is rounded once per call as for int8 rows (quantize_row_int16: x ~ xq * d_x, one d_x = max|x| / 32767 a row),
// and a block's w . xq is an exact integer dot product: 16 weights widened to int16 and multiply-added with xq by
// madd into 8 int32 (|w| <= 128, |xq| <= 32767: a block's sum is below 2^27).
// y[o] = d_x * sum over blocks b of d[o, b] * (w . xq)_b: each block's sum converted to float32 once (an error
// below 2^-24 of it), one float multiply-add a block.
// Why int16 a row, not llama.cpp's int8 blocks of 32 (ggml_vec_dot_q8_0_q8_0, d_x = max|x| / 127 a block): a
// model's last hidden state has outlier channels, and int8 steps of 1/127 of a block's largest are too coarse for
// the output layer's near-ties: on SmolLM2's "What is the capital of France?" the float logits of 'The' and 'L'
// are 25.325 and 25.243, and int8 blocks flip them (llama.cpp does the same on that file); int16 steps, 1/32767 of
// the row's largest, keep the float order (SmolLM2's greedy agreement with fp32, 8 prompts x 64 tokens: 70.5%,
// 59.8% with int8 blocks).
// Speed: a block's 8 int32 partial sums are converted to float32 and multiply-added with the block's scale (a
// broadcast from memory, the chunk's 8 scales converted from float16 at once), into 4 accumulators a row in turn
// (a chain of multiply-adds would wait on each other). Reducing 8 blocks' sums to one vector first (six hadds, as
// dot_chunk does for 4-bit weights) measured 7% (1 row) to 20% (2 rows) slower here: with the weights widened by
// shuffles too, the shuffle port was the bottleneck. Against int8 blocks of x (2-core machine, medians of 3 runs):
// 1 row 1.06-1.14x the time, 2 rows 0.96-1.06x, on 49152 x 576 and 1536 x 576, 1 and 2 threads; one float
// multiply-add more per 32 weights than int8 rows (which add int32 over 256): 1.07-1.18x their time. SmolLM2's
// decode (its output layer in this form) did not change measurably (163-171 tok/s before, 165-177 after).

// Block b of an int8 row times R rows of x (consecutive Int16Rows): acc[r][J] += scale * (w . xq_r)_b as 8 partial
// sums. The weight is widened once for the R rows.
template <int R, int J>
inline void dot_block_q8(const Int16Row *x, const int8_t *w, int64_t b, const float *scale, __m256 (*acc)[4]) {
  const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + 32 * b)));
  const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + 32 * b + 16)));
  const __m256 d = _mm256_broadcast_ss(scale);
  for (int r = 0; r < R; r++) {
    const auto *xq = reinterpret_cast<const __m256i *>(x[r].q.data() + 32 * b);
    const __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(xq)),
                                          _mm256_madd_epi16(w1, _mm256_loadu_si256(xq + 1)));  // 8 partial sums
    acc[r][J] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums), acc[r][J]);
  }
}

// Blocks [b0, b0 + n) of an int8 row (n <= 8) times R rows of x: block b0 + k into acc[r][k % 4] (indices known at
// compile time, so that the accumulators stay in registers). The chunk's scales are converted once for the R rows.
template <int R>
inline void dot_chunk_q8(const Int16Row *x, const int8_t *w, const c10::Half *d, int64_t b0, int64_t n,
                         __m256 (*acc)[4]) {
  alignas(32) float scales[kChunkBlocks];
  if (n == kChunkBlocks) {
    _mm256_store_ps(scales, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(d + b0))));
  } else {
    for (int64_t k = 0; k < n; k++) scales[k] = _cvtsh_ss(d[b0 + k].x);
  }
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    dot_block_q8<R, 0>(x, w, b0 + k, scales + k, acc);
    dot_block_q8<R, 1>(x, w, b0 + k + 1, scales + k + 1, acc);
    dot_block_q8<R, 2>(x, w, b0 + k + 2, scales + k + 2, acc);
    dot_block_q8<R, 3>(x, w, b0 + k + 3, scales + k + 3, acc);
  }
  if (k < n) dot_block_q8<R, 0>(x, w, b0 + k, scales + k, acc);
  if (k + 1 < n) dot_block_q8<R, 1>(x, w, b0 + k + 1, scales + k + 1, acc);
  if (k + 2 < n) dot_block_q8<R, 2>(x, w, b0 + k + 2, scales + k + 2, acc);
}

// One int8-block row times R rows of x (from quantize_row_int16), chunk by chunk: out[r * out_stride] = x_r . row.
// n_in: a multiple of 32.
template <int R>
inline void dot_rows_q8(const Int16Row *x, const int8_t *w, const c10::Half *d, int64_t n_in, float *out,
                        int64_t out_stride) {
  const int64_t n_blocks = n_in / 32, whole = n_blocks / kChunkBlocks * kChunkBlocks;
  __m256 acc[R][4];
  for (int r = 0; r < R; r++)
    for (int j = 0; j < 4; j++) acc[r][j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < whole; b += kChunkBlocks) {
    // fetch ahead, as dot_rows_group32 does: a chunk is 4 cache lines of weights and 16 bytes of scales
    const char *ahead = reinterpret_cast<const char *>(w + 32 * b) + kPrefetchBytes;
    for (int line = 0; line < 4; line++) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char *>(d + b) + kPrefetchBytes / 16, _MM_HINT_T0);
    dot_chunk_q8<R>(x, w, d, b, kChunkBlocks, acc);
  }
  if (whole < n_blocks) dot_chunk_q8<R>(x, w, d, whole, n_blocks - whole, acc);
  for (int r = 0; r < R; r++)
    out[r * out_stride] = hsum(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]))) *
                          x[r].scale;
}

}  // namespace torchchat_cpu

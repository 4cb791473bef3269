// Attention of a batch's query heads, each sequence over the filled positions of its own KV cache row, float32
// math, AVX2: attend_rows (and its helpers). The cache is float32 or float16 (c10::Half): a decode step reads all of
// it, so float16 halves the bytes. Shared by decode_attention.cpp (attention alone) and decode_layers.cpp (a whole
// transformer block).
#pragma once

#include "work_pool.h"
#include <c10/util/Half.h>

#include <immintrin.h>

#include "avx2_reduce.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace torchchat_cpu {

using torchchat_avx2::hmax;
using torchchat_avx2::hsum;
using torchchat_avx2::load8;

// exp(x) for x <= 0 (scores minus their maximum), 8 at a time: 2^n * e^r with r in [-ln2/2, ln2/2] and
// a degree-6 polynomial for e^r (Cephes' expf coefficients; relative error ~2e-7). Below -87 it is 0.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 is_tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n * ln2, in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(is_tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n)));
}

template <typename T>
float dot(const float *a, const T *b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; i++) sum += a[i] * static_cast<float>(b[i]);
  return sum;
}

// out += w * v, n values
template <typename T>
void axpy(float *out, float w, const T *v, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(wv, load8(v + i), _mm256_loadu_ps(out + i)));
  for (; i < n; i++) out[i] += w * static_cast<float>(v[i]);
}

// The sums of a0 .. a7, one a lane: [sum(a0), ..., sum(a7)].
inline __m256 sums8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // per 128-bit half
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// s[t] = q . k[t] * scale for t in [0, len). Speed: eight positions at a time, each q vector loaded once for
// the eight, the eight sums reduced together (one horizontal sum per position cost as much as its dot).
template <typename T>
void scores(const float *q, const T *k, float *s, int64_t len, int64_t head_dim, float scale) {
  int64_t t = 0;
  if (head_dim % 8 == 0) {
    const __m256 vscale = _mm256_set1_ps(scale);
    for (; t + 8 <= len; t += 8) {
      const T *kt = k + t * head_dim;
      __m256 a[8];
      for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
      for (int64_t i = 0; i < head_dim; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qv, load8(kt + j * head_dim + i), a[j]);
      }
      _mm256_storeu_ps(s + t, _mm256_mul_ps(sums8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]), vscale));
    }
  }
  for (; t < len; t++) s[t] = dot(q, k + t * head_dim, head_dim) * scale;
}

// out[0 .. 64) = sum over t of p[t] * v[t][0 .. 64), rows of v `stride` apart. Speed: the 64 sums stay in
// eight registers over all positions (axpy loads and stores them once a position).
template <typename T>
void weighted_sum64(const float *p, const T *v, int64_t stride, int64_t len, float *out) {
  __m256 a[8];
  for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < len; t++) {
    const __m256 w = _mm256_set1_ps(p[t]);
    const T *vt = v + t * stride;
    for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(w, load8(vt + 8 * j), a[j]);
  }
  for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + 8 * j, a[j]);
}

// A chunk's part of one query head's attention, over its len positions (rows of k and v, head_dim apart):
// m = the largest score, partial = (out[0 .. head_dim), m, sum over t of exp(s[t] - m)) with
// out = sum over t of exp(s[t] - m) v[t]. s: len floats of scratch.
template <typename T>
void attend_chunk(const float *q, const T *k, const T *v, int64_t len, int64_t head_dim, float scale, float *s,
                  float *partial) {
  scores(q, k, s, len, head_dim, scale);
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 8 <= len; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + t));
  float max = hmax(vmax);
  for (; t < len; t++) max = std::max(max, s[t]);
  __m256 vsum = _mm256_setzero_ps();
  const __m256 vm = _mm256_set1_ps(max);
  for (t = 0; t + 8 <= len; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
    _mm256_storeu_ps(s + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; t < len; t++) {
    s[t] = std::exp(s[t] - max);
    sum += s[t];
  }
  float *out = partial;
  int64_t i = 0;
  for (; i + 64 <= head_dim; i += 64) weighted_sum64(s, v + i, head_dim, len, out + i);
  std::fill(out + i, out + head_dim, 0.0f);  // the rest (head_dim not a multiple of 64), a position at a time
  if (i < head_dim)
    for (t = 0; t < len; t++) axpy(out + i, s[t], v + t * head_dim + i, head_dim - i);
  partial[head_dim] = max;
  partial[head_dim + 1] = sum;
}

constexpr int64_t kAttendChunk = 64;  // positions of a cache head a work unit reads

// One sequence of a batch: its query heads over the filled positions of its cache row.
template <typename T>
struct AttendRow {
  const float *q;  // (n_heads, head_dim) float32
  const T *k, *v;  // (n_kv, max_len, head_dim): the sequence's cache row
  float *out;      // (n_heads, head_dim) float32
  int64_t len;     // positions [0, len) attended
};

// Every query head of every row over its positions: out = softmax(q . k^T * scale) @ v a head; query head h reads
// cache head h / (n_heads / n_kv). T: float or c10::Half.
//
// Speed (flash-decoding): the work is split over the threads in ONE parallel region by (row, cache head, 64
// positions: a chunk each, work_pool.h), so that all threads stay busy when heads are few (SmolLM2: 3 cache heads,
// 2 threads) and each unit reads its K and V rows from memory once for all the query heads that share them (the
// others find them in cache); each head's chunk results are merged after. The split depends on neither the thread
// count nor the other rows, nor do a row's bits: a batch row's output equals the one-row call's.
template <typename T>
void attend_rows(const std::vector<AttendRow<T>> &rows, int64_t n_heads, int64_t n_kv, int64_t max_len,
                 int64_t head_dim, float scale) {
  const int64_t group = n_heads / n_kv, stride = head_dim + 2, n_rows = static_cast<int64_t>(rows.size());
  // first_unit[b], first_partial[b]: where row b's units (n_kv * its chunks) and partials begin
  std::vector<int64_t> first_unit(n_rows + 1, 0), first_partial(n_rows + 1, 0);
  for (int64_t b = 0; b < n_rows; b++) {
    const int64_t n_chunks = (rows[b].len + kAttendChunk - 1) / kAttendChunk;
    first_unit[b + 1] = first_unit[b] + n_kv * n_chunks;
    first_partial[b + 1] = first_partial[b] + n_heads * n_chunks * stride;
  }
  std::vector<float> partials(first_partial[n_rows]);  // per row: (n_heads, n_chunks, head_dim + 2), attend_chunk's
  parallel_chunks(first_unit[n_rows], 1, [&](int64_t begin, int64_t end) {
    float s[kAttendChunk];
    int64_t b = std::upper_bound(first_unit.begin(), first_unit.end(), begin) - first_unit.begin() - 1;
    for (int64_t unit = begin; unit < end; unit++) {
      while (unit >= first_unit[b + 1]) b++;
      const AttendRow<T> &row = rows[b];
      const int64_t n_chunks = (row.len + kAttendChunk - 1) / kAttendChunk, local = unit - first_unit[b];
      const int64_t j = local / n_chunks, c = local % n_chunks, first = c * kAttendChunk;
      const int64_t len = std::min(kAttendChunk, row.len - first), offset = (j * max_len + first) * head_dim;
      for (int64_t h = j * group; h < (j + 1) * group; h++)
        attend_chunk(row.q + h * head_dim, row.k + offset, row.v + offset, len, head_dim, scale, s,
                     partials.data() + first_partial[b] + (h * n_chunks + c) * stride);
    }
  });
  for (int64_t b = 0; b < n_rows; b++) {
    const int64_t n_chunks = (rows[b].len + kAttendChunk - 1) / kAttendChunk;
    for (int64_t h = 0; h < n_heads; h++) {  // merge: out = sum_c e^(m_c - m) out_c / sum_c e^(m_c - m) sum_c
      const float *p = partials.data() + first_partial[b] + h * n_chunks * stride;
      float max = -INFINITY, sum = 0.0f;
      for (int64_t c = 0; c < n_chunks; c++) max = std::max(max, p[c * stride + head_dim]);
      float *o = rows[b].out + h * head_dim;
      std::fill(o, o + head_dim, 0.0f);
      for (int64_t c = 0; c < n_chunks; c++) {
        const float w = std::exp(p[c * stride + head_dim] - max);
        sum += w * p[c * stride + head_dim + 1];
        axpy(o, w, p + c * stride, head_dim);
      }
      const float inv = 1.0f / sum;
      for (int64_t i = 0; i < head_dim; i++) o[i] *= inv;
    }
  }
}

}  // namespace torchchat_cpu

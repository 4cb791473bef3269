// torch.ops.torchchat.decode_attention(q, k_cache, v_cache, input_pos): attention of ONE new position
// over the filled part of a static KV cache, on CPU.
//
// Why: a decode step's query attends cache positions [0, p], p = input_pos[-1]. A compiled step keeps
// static shapes, so scaled_dot_product_attention reads the whole static cache (2048 positions in a
// chat), and its CPU flash kernel costs ~80 us a layer for one query row at 640 positions (SmolLM2's
// shapes; ~5 ms of a 36 ms compiled token in the profile). Here the op reads p from the tensor itself:
// static shapes for Dynamo, and only the filled positions are read (600 positions: ~49 us). Heads are
// split over torch's threads.
//
// q: (B, n_heads, 1, head_dim); k_cache, v_cache: (B, n_kv_heads, S, head_dim) float32 contiguous
// (n_heads a multiple of n_kv_heads: grouped heads share a cache head); input_pos: (1,) int64.
// Returns (B, n_heads, 1, head_dim) in q's dtype; float32 throughout, softmax scale 1/sqrt(head_dim).
// Built with gemv.cpp into one library by torchchat/cpu_kernels.py (see FLAGS there).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include "avx2_reduce.h"

#include <cmath>
#include <vector>

namespace {

using torchchat_avx2::hmax;
using torchchat_avx2::hsum;

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

inline float dot(const float *a, const float *b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; i++) sum += a[i] * b[i];
  return sum;
}

// out += w * v, n values
inline void axpy(float *out, float w, const float *v, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
  for (; i < n; i++) out[i] += w * v[i];
}

// One query head over positions [0, len) of its cache head: out = softmax(q . k^T * scale) @ v.
void attend_head(const float *q, const float *k, const float *v, float *out, int64_t len, int64_t head_dim,
                 float scale, std::vector<float> &scores) {
  scores.resize(len);
  float *s = scores.data();
  for (int64_t t = 0; t < len; t++) s[t] = dot(q, k + t * head_dim, head_dim) * scale;
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
  std::fill(out, out + head_dim, 0.0f);
  for (t = 0; t < len; t++) axpy(out, s[t], v + t * head_dim, head_dim);
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < head_dim; i++) out[i] *= inv;
}

at::Tensor decode_attention(const at::Tensor &q, const at::Tensor &k_cache, const at::Tensor &v_cache,
                            const at::Tensor &input_pos) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "torchchat::decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "torchchat::decode_attention: q must be (B, heads, 1, head_dim), got ",
              q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == q.size(0) &&
                  k_cache.size(3) == q.size(3) && q.size(1) % k_cache.size(1) == 0,
              "torchchat::decode_attention: caches must be (B, kv_heads, S, head_dim) with heads a multiple of "
              "kv_heads; got q ", q.sizes(), ", k ", k_cache.sizes(), ", v ", v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "torchchat::decode_attention: caches must be contiguous float32");
  TORCH_CHECK(input_pos.numel() == 1, "torchchat::decode_attention: one position, got ", input_pos.numel());
  const int64_t batch = q.size(0), n_heads = q.size(1), head_dim = q.size(3);
  const int64_t n_kv = k_cache.size(1), max_len = k_cache.size(2), group = n_heads / n_kv;
  const int64_t len = input_pos.item<int64_t>() + 1;  // attended positions [0, p]
  TORCH_CHECK(len >= 1 && len <= max_len, "torchchat::decode_attention: position ", len - 1,
              " is outside the cache (", max_len, " positions)");
  const at::Tensor q32 = q.to(at::kFloat).contiguous();  // (B, heads, 1, head_dim)
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));  // (B, heads, 1, head_dim)
  const float *qp = q32.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  float *op = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  at::parallel_for(0, batch * n_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t b = bh / n_heads, h = bh % n_heads;
      const int64_t cache_head = (b * n_kv + h / group) * max_len * head_dim;
      attend_head(qp + bh * head_dim, kp + cache_head, vp + cache_head, op + bh * head_dim, len, head_dim, scale,
                  scores);
    }
  });
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchchat, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor input_pos) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchchat, CPU, m) { m.impl("decode_attention", &decode_attention); }

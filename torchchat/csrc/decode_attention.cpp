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

#include "attend.h"

#include <cmath>
#include <vector>

namespace {

using namespace torchchat_cpu;

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

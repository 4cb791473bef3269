// torch.ops.torchchat.decode_attention(q, k_cache, v_cache, input_pos, rows): attention of ONE new position of
// each sequence of a batch over the filled part of its row of a static KV cache, on CPU.
//
// Why: a decode step's query attends cache positions [0, p], p its position. A compiled step keeps static shapes,
// so scaled_dot_product_attention reads the whole static cache (2048 positions in a chat), and its CPU flash
// kernel costs ~80 us a layer for one query row at 640 positions (SmolLM2's shapes; ~5 ms of a 36 ms compiled
// token in the profile). Here the op reads each p from the tensor itself: static shapes for Dynamo, and only the
// filled positions are read (600 positions: ~49 us). Sequences of a batch sit at their own positions in their own
// cache rows (continuous batching); the work of all of them is split over torch's threads in one region by
// (sequence, cache head, 64 positions) (attend.h), and a sequence's result is bit-identical to a batch of one.
//
// q: (B, n_heads, 1, head_dim); k_cache, v_cache: the whole caches, (N, n_kv_heads, S, head_dim) float32 or
// float16, contiguous (n_heads a multiple of n_kv_heads: grouped heads share a cache head); input_pos: (B,) int64,
// row b attends positions [0, input_pos[b]]; rows: (B,) int64, the cache row of batch row b (0 <= rows[b] < N).
// Returns (B, n_heads, 1, head_dim) in q's dtype; float32 math, softmax scale 1/sqrt(head_dim).
// Built with gemv.cpp into one library by torchchat/cpu/kernels.py (see FLAGS there).

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
                            const at::Tensor &input_pos, const at::Tensor &rows) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
                  input_pos.device().is_cpu() && rows.device().is_cpu(),
              "torchchat::decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "torchchat::decode_attention: q must be (B, heads, 1, head_dim), got ",
              q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == q.size(3) &&
                  q.size(1) % k_cache.size(1) == 0,
              "torchchat::decode_attention: caches must be (N, kv_heads, S, head_dim) with heads a multiple of "
              "kv_heads; got q ", q.sizes(), ", k ", k_cache.sizes(), ", v ", v_cache.sizes());
  const at::ScalarType cache_dtype = k_cache.scalar_type();
  TORCH_CHECK((cache_dtype == at::kFloat || cache_dtype == at::kHalf) && v_cache.scalar_type() == cache_dtype &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "torchchat::decode_attention: caches must be contiguous, both float32 or both float16");
  const int64_t batch = q.size(0), n_heads = q.size(1), head_dim = q.size(3);
  const int64_t n_cache_rows = k_cache.size(0), n_kv = k_cache.size(1), max_len = k_cache.size(2);
  TORCH_CHECK(input_pos.numel() == batch && rows.numel() == batch, "torchchat::decode_attention: ", batch,
              " sequences need ", batch, " positions and ", batch, " cache rows, got ", input_pos.numel(), " and ",
              rows.numel());
  const at::Tensor positions = input_pos.to(at::kLong).contiguous(), cache_rows = rows.to(at::kLong).contiguous();
  const at::Tensor q32 = q.to(at::kFloat).contiguous();                 // (B, heads, 1, head_dim)
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));  // (B, heads, 1, head_dim)
  const int64_t q_size = n_heads * head_dim, cache_size = n_kv * max_len * head_dim;  // one sequence's
  const auto run = [&]<typename T>(const T *k, const T *v) {
    std::vector<AttendRow<T>> batch_rows;
    for (int64_t b = 0; b < batch; b++) {
      const int64_t pos = positions.data_ptr<int64_t>()[b], row = cache_rows.data_ptr<int64_t>()[b];
      TORCH_CHECK(pos >= 0 && pos < max_len, "torchchat::decode_attention: position ", pos,
                  " is outside the cache (", max_len, " positions)");
      TORCH_CHECK(row >= 0 && row < n_cache_rows, "torchchat::decode_attention: cache row ", row,
                  " is outside the cache (", n_cache_rows, " rows)");
      batch_rows.push_back({q32.data_ptr<float>() + b * q_size, k + row * cache_size, v + row * cache_size,
                            out.data_ptr<float>() + b * q_size, pos + 1});
    }
    attend_rows(batch_rows, n_heads, n_kv, max_len, head_dim, 1.0f / std::sqrt(static_cast<float>(head_dim)));
  };
  if (cache_dtype == at::kHalf)
    run(k_cache.data_ptr<c10::Half>(), v_cache.data_ptr<c10::Half>());
  else
    run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchchat, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor input_pos, Tensor rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchchat, CPU, m) { m.impl("decode_attention", &decode_attention); }

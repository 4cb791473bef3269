// torch.ops.torchchat.decode_layers(x, norms, eps, linears, group_sizes, k_caches, v_caches, rope, input_pos, rows):
// a stack of Llama transformer blocks (model.TransformerBlock, a whole model's layers) for ONE new position of each
// sequence of a batch, each at its own position in its own cache row, on CPU, in one call. Each block, each row:
//   h = x + wo(attention(rope(wq(n1)), rope(wk(n1)), wv(n1)))  with n1 = rms_norm(x) * attention_norm
//   out = h + w2(silu(w1(n2)) * w3(n2))                         with n2 = rms_norm(h) * ffn_norm
// writing the row's key and value into its cache row at its position.
//
// Why: with the weights streaming at memory speed (gemv.cpp), a small model's token was mostly per-op
// overhead: SmolLM2's compiled int4 step made ~240 op calls and ~150 small Inductor kernels a token,
// ~4 ms of ~13 (docs/performance.md), each a dispatch and a wake-up of the threads. Here a step is one
// dispatch (a call with this many arguments costs ~20-40 us from Python, so one a layer was still ~1 ms of a
// SmolLM2 token), a block is five parallel regions (q/k/v rows together, attention heads, wo, w1/w3 rows
// together, w2), the norms, rotary, SwiGLU and residuals run in registers between them, and a 4-bit input is
// quantized once for the three (or two) products that share it.
// Batches: each region serves every row of the step (linear_rows.h: a weight is read once for all of them;
// attend.h: one region over (row, cache head, 64 positions)), and every per-row step is the function a batch of
// one runs, so a row's output and cache writes are bit-identical to a call with that row alone.
//
// x: (B, 1, dim) float32/bfloat16 (computed in float32 and returned in x's dtype; a bfloat16 x is rounded to
// bfloat16 wherever the bfloat16 modules round, see round_bf16). For n blocks, in order:
// norms: 2n, (attention_norm, ffn_norm) of each, (dim,). linears: 14n, (weight, aux) for wq, wk, wv, wo, w1,
// w3, w2 of each, every one of
//   float32 or bfloat16 weight (out, in), aux None;
//   int8 weight (out, in), aux (out,) float32 row scales, group size 0 (quantize.Int8Linear);
//   int8 weight (out, in), aux (out, in / 32) float16 block scales, group size 32 (Int8Linear's block form:
//   llama.cpp's Q8_0);
//   uint8 packed (out, in / 2), aux (out, in / g, 2) float16, g = its group size (quantize.Int4Linear);
// group_sizes: 7n ints, 0 where neither 4-bit nor int8 blocks. k_caches, v_caches: n each, the whole caches
// (N, n_kv_heads, S, head_dim), contiguous, all float32 or all float16 (k and v are rounded to it, as the modules'
// cache write rounds). rope: (B, 1, head_dim / 2, 2) float32, (cos, sin) at each row's position. input_pos: (B,)
// int64, the rows' positions; rows: (B,) int64, distinct, the rows' cache rows (0 <= rows[b] < N).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include "attend.h"
#include "gemv_rows.h"
#include "linear_rows.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

namespace {

using namespace torchchat_cpu;

// A block's linears by index, in the order torchchat/cpu/decode.py's BLOCK_LINEARS declares and builds the
// arguments from (tests/test_decode_layers.py checks the two agree).
constexpr int kLinears = 7;
enum LinearIndex { kWq, kWk, kWv, kWo, kW1, kW3, kW2 };
constexpr std::array<const char *, kLinears> kLinearNames = {"wq", "wk", "wv", "wo", "w1", "w3", "w2"};

// v[0 .. n) rounded to bfloat16 (nearest, ties to even, as torch rounds) and kept in float32: a bfloat16
// model's modules round after every op; the block does the same where they do, so that its tokens are
// theirs (DistributedGenerator's TP ranks run the modules: local and distributed greedy tokens must agree).
void round_bf16(float *v, int64_t n) {
  const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1),
                high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(v + i));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
    const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(bias, odd)), high);
    _mm256_storeu_ps(v + i, _mm256_castsi256_ps(rounded));
  }
  for (; i < n; i++) v[i] = static_cast<float>(c10::BFloat16(v[i]));
}

// out = x / sqrt(mean(x^2) + eps) * weight, as model.RMSNorm (float32; bf16: rounded where the module rounds).
void rms_norm(const float *x, const float *weight, float eps, float *out, int64_t n, bool bf16) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), acc);
  float sum = hsum(acc);
  for (; i < n; i++) sum += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (i = 0; i < n; i++) out[i] = x[i] * inv;
  if (!bf16) {
    for (i = 0; i < n; i++) out[i] *= weight[i];
    return;
  }
  round_bf16(out, n);  // normed.type_as(x)
  for (i = 0; i < n; i++) out[i] *= weight[i];
  round_bf16(out, n);  // * weight, in bfloat16
}

// Rotate interleaved pairs of each head in place by (cos, sin) (model.apply_rotary_emb): rope (head_dim / 2, 2).
void rotate(float *heads, int64_t n_heads, int64_t head_dim, const float *rope) {
  for (int64_t h = 0; h < n_heads; h++) {
    float *v = heads + h * head_dim;
    for (int64_t j = 0; j < head_dim / 2; j++) {
      const float c = rope[2 * j], s = rope[2 * j + 1], a = v[2 * j], b = v[2 * j + 1];
      v[2 * j] = a * c - b * s;
      v[2 * j + 1] = b * c + a * s;
    }
  }
}

// v[i] = silu(v[i]) = v[i] * sigmoid(v[i]) in place; exp8 takes arguments <= 0: e = exp(-|a|),
// sigmoid(a) = 1 / (1 + e) for a >= 0, e / (1 + e) below.
void silu(float *v, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(v + i);
    const __m256 e = exp8(_mm256_or_ps(a, sign));  // exp(-|a|)
    const __m256 numerator = _mm256_blendv_ps(one, e, a);  // a's sign bit set (a < 0): e
    _mm256_storeu_ps(v + i, _mm256_mul_ps(a, _mm256_div_ps(numerator, _mm256_add_ps(one, e))));
  }
  for (; i < n; i++) v[i] = v[i] / (1.0f + std::exp(-v[i]));
}

// gate[i] = silu(gate[i]) * up[i] (model.FeedForward); bf16: rounded where the bf16 modules round, after silu
// and after the product.
void swiglu(float *gate, const float *up, int64_t n, bool bf16) {
  silu(gate, n);
  if (bf16) round_bf16(gate, n);
  for (int64_t i = 0; i < n; i++) gate[i] *= up[i];
  if (bf16) round_bf16(gate, n);
}

// One block's weights and caches, checked: what run_block reads.
struct Block {
  at::Tensor attention_norm, ffn_norm;  // (dim,) float32 (converted here if bfloat16)
  std::array<LinearWeight, kLinears> w;
  void *k_cache, *v_cache;  // (N, n_kv, max_len, head_dim), float32 or float16
  bool half_cache;
  int64_t dim, n_heads, n_kv, max_len, head_dim, hidden;
};

// linears[first .. first + 14), group_sizes[first / 2 .. first / 2 + 7): this block's (see the file's header)
Block block_from(int64_t dim, const at::Tensor &attention_norm, const at::Tensor &ffn_norm,
                 const c10::List<std::optional<at::Tensor>> &linears, int64_t first, at::IntArrayRef group_sizes,
                 const at::Tensor &k_cache, const at::Tensor &v_cache) {
  Block b;
  for (int i = 0; i < kLinears; i++)
    b.w[i] = linear_weight(linears.get(first + 2 * i), linears.get(first + 2 * i + 1), group_sizes[first / 2 + i],
                           "torchchat::decode_layers", kLinearNames[i]);
  const at::ScalarType cache_dtype = k_cache.scalar_type();
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  (cache_dtype == at::kFloat || cache_dtype == at::kHalf) && v_cache.scalar_type() == cache_dtype &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.device().is_cpu() &&
                  v_cache.device().is_cpu(),
              "torchchat::decode_layers: caches must be (N, kv_heads, S, head_dim) contiguous, both float32 or both "
              "float16, got k ", k_cache.sizes(), " ", k_cache.scalar_type(), ", v ", v_cache.sizes(), " ",
              v_cache.scalar_type());
  b.dim = dim;
  b.n_kv = k_cache.size(1), b.max_len = k_cache.size(2), b.head_dim = k_cache.size(3);
  const int64_t q_dim = b.w[kWq].n_out, kv_dim = b.n_kv * b.head_dim;
  b.n_heads = q_dim / b.head_dim;
  b.hidden = b.w[kW1].n_out;
  const auto &w = b.w;
  TORCH_CHECK(q_dim % b.head_dim == 0 && b.n_heads % b.n_kv == 0 && b.head_dim % 2 == 0 &&
                  w[kWq].n_in == dim && w[kWk].n_in == dim && w[kWv].n_in == dim && w[kWk].n_out == kv_dim &&
                  w[kWv].n_out == kv_dim && w[kWo].n_in == q_dim && w[kWo].n_out == dim && w[kW1].n_in == dim &&
                  w[kW3].n_in == dim && w[kW3].n_out == b.hidden && w[kW2].n_in == b.hidden && w[kW2].n_out == dim,
              "torchchat::decode_layers: weight shapes do not make a block of dim ", dim, ", head_dim ", b.head_dim,
              ", ", b.n_kv, " kv heads");
  TORCH_CHECK(attention_norm.numel() == dim && ffn_norm.numel() == dim, "torchchat::decode_layers: norms of ", dim,
              " values");
  b.attention_norm = attention_norm.reshape({dim}).to(at::kFloat).contiguous();
  b.ffn_norm = ffn_norm.reshape({dim}).to(at::kFloat).contiguous();
  b.k_cache = k_cache.data_ptr();
  b.v_cache = v_cache.data_ptr();
  b.half_cache = cache_dtype == at::kHalf;
  return b;
}

// The batch of a step: where each row reads and writes.
struct Step {
  int64_t n_rows;
  const int64_t *pos;        // (B,) each row's position
  const int64_t *cache_row;  // (B,) each row's cache row
  const float *rope;         // (B, head_dim / 2, 2) each row's (cos, sin)
};

// Writes each row's k and v (n_kv, head_dim), at qkv + r * qkv_stride + q_dim (and + kv_dim), into its cache row at
// its position (as T: float, or c10::Half rounding to nearest even as torch's .to(float16) does), then attends
// every query head of every row over its positions [0, pos], in one parallel region.
template <typename T>
void cache_and_attend(const Block &b, const Step &step, const float *qkv, int64_t qkv_stride, float *attended) {
  const int64_t head_dim = b.head_dim, max_len = b.max_len, q_dim = b.n_heads * head_dim, kv_dim = b.n_kv * head_dim;
  const int64_t cache_size = b.n_kv * max_len * head_dim;  // one cache row's
  T *k_caches = static_cast<T *>(b.k_cache), *v_caches = static_cast<T *>(b.v_cache);
  std::vector<AttendRow<T>> rows;
  for (int64_t r = 0; r < step.n_rows; r++) {
    const float *q = qkv + r * qkv_stride, *k = q + q_dim, *v = k + kv_dim;
    T *k_cache = k_caches + step.cache_row[r] * cache_size, *v_cache = v_caches + step.cache_row[r] * cache_size;
    const int64_t pos = step.pos[r];
    for (int64_t j = 0; j < b.n_kv; j++) {  // cache rows (j, pos)
      std::copy(k + j * head_dim, k + (j + 1) * head_dim, k_cache + (j * max_len + pos) * head_dim);
      std::copy(v + j * head_dim, v + (j + 1) * head_dim, v_cache + (j * max_len + pos) * head_dim);
    }
    rows.push_back({q, k_cache, v_cache, attended + r * q_dim, pos + 1});
  }
  attend_rows(rows, b.n_heads, b.n_kv, max_len, head_dim, 1.0f / std::sqrt(static_cast<float>(head_dim)));
}

// h (B, dim) in place, each row: h + attention(norm(h)), then + feed-forward(norm(.)); writes each row's position
// of its cache row.
void run_block(const Block &b, float *h, const Step &step, float eps, bool bf16) {
  const int64_t dim = b.dim, head_dim = b.head_dim, n_kv = b.n_kv, hidden = b.hidden, n_rows = step.n_rows;
  const int64_t q_dim = b.n_heads * head_dim, kv_dim = n_kv * head_dim, qkv_dim = q_dim + 2 * kv_dim;
  const auto &w = b.w;
  const auto round = [bf16](float *v, int64_t n) {
    if (bf16) round_bf16(v, n);
  };
  // scratch, each (B, .): normed (dim), qkv (q | k | v), attention out (q_dim), gate_up (gate | up: 2 hidden),
  // a product (dim)
  std::vector<float> scratch(n_rows * (2 * dim + qkv_dim + q_dim + 2 * hidden));
  float *normed = scratch.data(), *qkv = normed + n_rows * dim, *attended = qkv + n_rows * qkv_dim,
        *gate_up = attended + n_rows * q_dim, *product = gate_up + n_rows * 2 * hidden;

  for (int64_t r = 0; r < n_rows; r++)
    rms_norm(h + r * dim, b.attention_norm.data_ptr<float>(), eps, normed + r * dim, dim, bf16);
  multiply(normed, n_rows, dim,
           std::array<Product, 3>{{{&w[kWq], qkv, qkv_dim}, {&w[kWk], qkv + q_dim, qkv_dim},
                                   {&w[kWv], qkv + q_dim + kv_dim, qkv_dim}}});
  for (int64_t r = 0; r < n_rows; r++) {
    float *q = qkv + r * qkv_dim, *k = q + q_dim;
    const float *rope = step.rope + r * head_dim;
    round(q, qkv_dim);  // q, k, v
    rotate(q, b.n_heads, head_dim, rope);
    rotate(k, n_kv, head_dim, rope);
    round(q, q_dim + kv_dim);  // rotated q, k
  }
  if (b.half_cache)
    cache_and_attend<c10::Half>(b, step, qkv, qkv_dim, attended);
  else
    cache_and_attend<float>(b, step, qkv, qkv_dim, attended);
  for (int64_t r = 0; r < n_rows; r++) round(attended + r * q_dim, q_dim);
  multiply(attended, n_rows, q_dim, std::array<Product, 1>{{{&w[kWo], product, dim}}});
  for (int64_t r = 0; r < n_rows; r++) {
    float *hr = h + r * dim, *pr = product + r * dim;
    round(pr, dim);
    for (int64_t i = 0; i < dim; i++) hr[i] += pr[i];  // h = x + attention
    round(hr, dim);
    rms_norm(hr, b.ffn_norm.data_ptr<float>(), eps, normed + r * dim, dim, bf16);
  }
  multiply(normed, n_rows, dim,
           std::array<Product, 2>{{{&w[kW1], gate_up, 2 * hidden}, {&w[kW3], gate_up + hidden, 2 * hidden}}});
  for (int64_t r = 0; r < n_rows; r++) {
    float *gate = gate_up + r * 2 * hidden;
    round(gate, 2 * hidden);  // gate, up
    swiglu(gate, gate + hidden, hidden, bf16);
  }
  multiply(gate_up, n_rows, 2 * hidden, std::array<Product, 1>{{{&w[kW2], product, dim}}});
  for (int64_t r = 0; r < n_rows; r++) {
    float *hr = h + r * dim, *pr = product + r * dim;
    round(pr, dim);
    for (int64_t i = 0; i < dim; i++) hr[i] += pr[i];  // out = h + feed-forward
    round(hr, dim);
  }
}

// x's checks; returns (B, dim).
std::pair<int64_t, int64_t> check_x(const at::Tensor &x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(1) == 1 && x.numel() > 0 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "torchchat::decode_layers: x must be (B, 1, dim): one position of each sequence, float32 or bfloat16, "
              "got ", x.sizes(), " ", x.scalar_type());
  return {x.size(0), x.size(2)};
}

// rope's, the positions' and the cache rows' checks, for B rows and caches of n_cache_rows rows, of the first
// block's shape.
void check_step(const at::Tensor &rope, const at::Tensor &positions, const at::Tensor &cache_rows, int64_t n_rows,
                int64_t n_cache_rows, const Block &first) {
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.numel() == n_rows * first.head_dim,
              "torchchat::decode_layers: rope must be (", n_rows, ", 1, ", first.head_dim / 2, ", 2) float32, got ",
              rope.sizes(), " ", rope.scalar_type());
  TORCH_CHECK(rope.device().is_cpu() && positions.device().is_cpu() && cache_rows.device().is_cpu(),
              "torchchat::decode_layers: CPU tensors only");
  TORCH_CHECK(positions.numel() == n_rows && cache_rows.numel() == n_rows, "torchchat::decode_layers: ", n_rows,
              " sequences need ", n_rows, " positions and ", n_rows, " cache rows, got ", positions.numel(), " and ",
              cache_rows.numel());
  const int64_t *pos = positions.data_ptr<int64_t>(), *row = cache_rows.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> written;  // (cache row, position) of each row
  for (int64_t r = 0; r < n_rows; r++) {
    TORCH_CHECK(pos[r] >= 0 && pos[r] < first.max_len, "torchchat::decode_layers: position ", pos[r],
                " is outside the cache (", first.max_len, " positions)");
    TORCH_CHECK(row[r] >= 0 && row[r] < n_cache_rows, "torchchat::decode_layers: cache row ", row[r],
                " is outside the cache (", n_cache_rows, " rows)");
    written.emplace_back(row[r], pos[r]);
  }
  // Rows may share a cache row at different positions (a verification step of speculative decoding: one sequence's
  // newest token and its draft tokens): each layer writes every row's keys and values before any row attends, so a
  // row sees the positions the rows before it wrote, up to its own. One position written twice is refused.
  std::sort(written.begin(), written.end());
  const auto twice = std::adjacent_find(written.begin(), written.end());
  TORCH_CHECK(twice == written.end(), "torchchat::decode_layers: position ", twice == written.end() ? 0 : twice->second,
              " of cache row ", twice == written.end() ? 0 : twice->first, " is given twice: each row writes its own");
}

at::Tensor decode_layers(const at::Tensor &x, at::TensorList norms, double eps,
                         const c10::List<std::optional<at::Tensor>> &linears, at::IntArrayRef group_sizes,
                         at::TensorList k_caches, at::TensorList v_caches, const at::Tensor &rope,
                         const at::Tensor &input_pos, const at::Tensor &rows) {
  const int64_t n = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(n > 0 && v_caches.size() == static_cast<size_t>(n) && norms.size() == static_cast<size_t>(2 * n) &&
                  linears.size() == static_cast<size_t>(2 * kLinears * n) &&
                  group_sizes.size() == static_cast<size_t>(kLinears * n),
              "torchchat::decode_layers: for ", n, " layers, ", 2 * n, " norms, ", 2 * kLinears * n,
              " linear tensors and ", kLinears * n, " group sizes; got ", norms.size(), ", ", linears.size(), ", ",
              group_sizes.size());
  const auto [n_rows, dim] = check_x(x);
  std::vector<Block> blocks;
  blocks.reserve(n);
  for (int64_t l = 0; l < n; l++)
    blocks.push_back(block_from(dim, norms[2 * l], norms[2 * l + 1], linears, 2 * kLinears * l, group_sizes,
                                k_caches[l], v_caches[l]));
  for (int64_t l = 0; l < n; l++)
    TORCH_CHECK(blocks[l].max_len == blocks[0].max_len && blocks[l].head_dim == blocks[0].head_dim &&
                    k_caches[l].size(0) == k_caches[0].size(0),
                "torchchat::decode_layers: every layer's cache must have the first one's rows, length and head_dim");
  const at::Tensor positions = input_pos.to(at::kLong).contiguous(), cache_rows = rows.to(at::kLong).contiguous();
  const at::Tensor ropes = rope.contiguous();  // (B, 1, head_dim / 2, 2)
  check_step(ropes, positions, cache_rows, n_rows, k_caches[0].size(0), blocks[0]);
  const Step step{n_rows, positions.data_ptr<int64_t>(), cache_rows.data_ptr<int64_t>(), ropes.data_ptr<float>()};
  // (B, dim), updated in place
  at::Tensor h = x.reshape({n_rows, dim}).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  const bool bf16 = x.scalar_type() == at::kBFloat16;  // round as the modules do (see round_bf16)
  for (const Block &b : blocks) run_block(b, h.data_ptr<float>(), step, static_cast<float>(eps), bf16);
  return h.view(x.sizes()).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchchat, m) {
  m.def("decode_layers(Tensor x, Tensor[] norms, float eps, Tensor?[] linears, int[] group_sizes, "
        "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor rope, Tensor input_pos, Tensor rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchchat, CPU, m) {
  m.impl("decode_layers", &decode_layers);
}

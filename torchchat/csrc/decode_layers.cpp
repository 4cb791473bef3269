// torch.ops.torchchat.decode_layers(x, norms, eps, linears, group_sizes, k_caches, v_caches, rope, input_pos):
// a stack of Llama transformer blocks (model.TransformerBlock, a whole model's layers) for ONE position of ONE
// sequence, on CPU, in one call. Each block:
//   h = x + wo(attention(rope(wq(n1)), rope(wk(n1)), wv(n1)))  with n1 = rms_norm(x) * attention_norm
//   out = h + w2(silu(w1(n2)) * w3(n2))                         with n2 = rms_norm(h) * ffn_norm
// writing this position's key and value into its caches.
//
// Why: with the weights streaming at memory speed (gemv.cpp), a small model's token was mostly per-op
// overhead: SmolLM2's compiled int4 step made ~240 op calls and ~150 small Inductor kernels a token,
// ~4 ms of ~13 (docs/performance.md), each a dispatch and a wake-up of the threads. Here a token is one
// dispatch (a call with this many arguments costs ~20-40 us from Python, so one a layer was still ~1 ms of a
// SmolLM2 token), a block is five parallel regions (q/k/v rows together, attention heads, wo, w1/w3 rows
// together, w2), the norms, rotary, SwiGLU and residuals run in registers between them, and a 4-bit input is
// quantized once for the three (or two) products that share it.
//
// x: (1, 1, dim) float32/bfloat16 (computed in float32 and returned in x's dtype; a bfloat16 x is rounded to
// bfloat16 wherever the bfloat16 modules round, see round_bf16). For n blocks, in order:
// norms: 2n, (attention_norm, ffn_norm) of each, (dim,). linears: 14n, (weight, aux) for wq, wk, wv, wo, w1,
// w3, w2 of each, every one of
//   float32 or bfloat16 weight (out, in), aux None;
//   int8 weight (out, in), aux (out,) float32 row scales (quantize.Int8Linear);
//   uint8 packed (out, in / 2), aux (out, in / g, 2) float16, g = its group size (quantize.Int4Linear);
// group_sizes: 7n ints, 0 where not 4-bit. k_caches, v_caches: n each, (B, n_kv_heads, S, head_dim), contiguous,
// all float32 or all float16 (the position's k and v are rounded to it, as the modules' cache write rounds);
// row 0 is this sequence's. rope: (1, head_dim / 2, 2) float32 (cos, sin) at this position.
// input_pos: (1,) int64.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include "attend.h"
#include "gemv_rows.h"
#include "linear_rows.h"

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

LinearWeight linear_weight(const std::optional<at::Tensor> &weight, const std::optional<at::Tensor> &aux,
                           int64_t group_size, const char *name) {
  TORCH_CHECK(weight.has_value() && weight->dim() == 2 && weight->is_contiguous() && weight->device().is_cpu(),
              "torchchat::decode_layers: ", name, " must be a contiguous 2-D CPU tensor");
  LinearWeight w{weight->scalar_type(), weight->data_ptr()};
  w.n_out = weight->size(0);
  w.n_in = weight->size(1);
  switch (w.dtype) {
    case at::kFloat:
    case at::kBFloat16:
      TORCH_CHECK(!aux.has_value() && group_size == 0, "torchchat::decode_layers: ", name, " is a float weight: no aux");
      break;
    case at::kChar:
      TORCH_CHECK(aux.has_value() && aux->scalar_type() == at::kFloat && aux->is_contiguous() &&
                      aux->numel() == w.n_out,
                  "torchchat::decode_layers: int8 ", name, " needs (", w.n_out, ",) float32 row scales");
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
      TORCH_CHECK(false, "torchchat::decode_layers: ", name, " has dtype ", w.dtype,
                  ": float32, bfloat16, int8 or 4-bit packed uint8 only");
  }
  return w;
}

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
  void *k_cache, *v_cache;  // sequence 0 of (B, n_kv, max_len, head_dim), float32 or float16
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
                           kLinearNames[i]);
  const at::ScalarType cache_dtype = k_cache.scalar_type();
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  (cache_dtype == at::kFloat || cache_dtype == at::kHalf) && v_cache.scalar_type() == cache_dtype &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.device().is_cpu() &&
                  v_cache.device().is_cpu(),
              "torchchat::decode_layers: caches must be (B, kv_heads, S, head_dim) contiguous, both float32 or both "
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

// Writes this position's k and v (n_kv, head_dim) into the caches (as T: float, or c10::Half rounding to
// nearest even as torch's .to(float16) does), then attends every query head over positions [0, pos].
template <typename T>
void cache_and_attend(const Block &b, const float *q, const float *k, const float *v, int64_t pos, float *attended) {
  const int64_t head_dim = b.head_dim, max_len = b.max_len;
  T *k_cache = static_cast<T *>(b.k_cache), *v_cache = static_cast<T *>(b.v_cache);
  for (int64_t j = 0; j < b.n_kv; j++) {  // cache rows (j, pos)
    std::copy(k + j * head_dim, k + (j + 1) * head_dim, k_cache + (j * max_len + pos) * head_dim);
    std::copy(v + j * head_dim, v + (j + 1) * head_dim, v_cache + (j * max_len + pos) * head_dim);
  }
  attend(q, k_cache, v_cache, attended, b.n_heads, b.n_kv, max_len, pos + 1, head_dim,
         1.0f / std::sqrt(static_cast<float>(head_dim)));
}

// h (dim,) in place: h + attention(norm(h)), then + feed-forward(norm(.)); writes position pos of the caches.
void run_block(const Block &b, float *h, const float *rope, int64_t pos, float eps, bool bf16) {
  const int64_t dim = b.dim, head_dim = b.head_dim, n_kv = b.n_kv, hidden = b.hidden;
  const int64_t q_dim = b.n_heads * head_dim, kv_dim = n_kv * head_dim;
  const auto &w = b.w;
  const auto round = [bf16](float *v, int64_t n) {
    if (bf16) round_bf16(v, n);
  };
  // scratch: normed (dim), q (q_dim), k, v (kv_dim), attention out (q_dim), gate, up (hidden), a product (dim)
  std::vector<float> scratch(2 * dim + 2 * q_dim + 2 * kv_dim + 2 * hidden);
  float *normed = scratch.data(), *q = normed + dim, *k = q + q_dim, *v = k + kv_dim, *attended = v + kv_dim,
        *gate = attended + q_dim, *up = gate + hidden, *product = up + hidden;

  rms_norm(h, b.attention_norm.data_ptr<float>(), eps, normed, dim, bf16);
  multiply(normed, std::array<Product, 3>{{{&w[kWq], q}, {&w[kWk], k}, {&w[kWv], v}}});
  round(q, q_dim + 2 * kv_dim);  // q, k, v are contiguous
  rotate(q, b.n_heads, head_dim, rope);
  rotate(k, n_kv, head_dim, rope);
  round(q, q_dim + kv_dim);  // rotated q, k
  if (b.half_cache)
    cache_and_attend<c10::Half>(b, q, k, v, pos, attended);
  else
    cache_and_attend<float>(b, q, k, v, pos, attended);
  round(attended, q_dim);
  multiply(attended, std::array<Product, 1>{{{&w[kWo], product}}});
  round(product, dim);
  for (int64_t i = 0; i < dim; i++) h[i] += product[i];  // h = x + attention
  round(h, dim);

  rms_norm(h, b.ffn_norm.data_ptr<float>(), eps, normed, dim, bf16);
  multiply(normed, std::array<Product, 2>{{{&w[kW1], gate}, {&w[kW3], up}}});
  round(gate, 2 * hidden);  // gate, up
  swiglu(gate, up, hidden, bf16);
  multiply(gate, std::array<Product, 1>{{{&w[kW2], product}}});
  round(product, dim);
  for (int64_t i = 0; i < dim; i++) h[i] += product[i];  // out = h + feed-forward
  round(h, dim);
}

// rope's and the position's checks; returns the position.
int64_t check_step(const at::Tensor &rope, const at::Tensor &input_pos, const Block &first) {
  TORCH_CHECK(rope.scalar_type() == at::kFloat && rope.numel() == first.head_dim && rope.is_contiguous(),
              "torchchat::decode_layers: rope must be (1, ", first.head_dim / 2, ", 2) float32");
  TORCH_CHECK(input_pos.numel() == 1, "torchchat::decode_layers: one position, got ", input_pos.numel());
  const int64_t pos = input_pos.item<int64_t>();
  TORCH_CHECK(pos >= 0 && pos < first.max_len, "torchchat::decode_layers: position ", pos, " is outside the cache (",
              first.max_len, " positions)");
  return pos;
}

int64_t check_x(const at::Tensor &x) {
  const int64_t dim = x.size(-1);
  TORCH_CHECK(x.device().is_cpu() && x.numel() == dim && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "torchchat::decode_layers: x must be one position of one sequence, float32 or bfloat16, got ", x.sizes());
  return dim;
}

at::Tensor decode_layers(const at::Tensor &x, at::TensorList norms, double eps,
                         const c10::List<std::optional<at::Tensor>> &linears, at::IntArrayRef group_sizes,
                         at::TensorList k_caches, at::TensorList v_caches, const at::Tensor &rope,
                         const at::Tensor &input_pos) {
  const int64_t n = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(n > 0 && v_caches.size() == static_cast<size_t>(n) && norms.size() == static_cast<size_t>(2 * n) &&
                  linears.size() == static_cast<size_t>(2 * kLinears * n) &&
                  group_sizes.size() == static_cast<size_t>(kLinears * n),
              "torchchat::decode_layers: for ", n, " layers, ", 2 * n, " norms, ", 2 * kLinears * n,
              " linear tensors and ", kLinears * n, " group sizes; got ", norms.size(), ", ", linears.size(), ", ",
              group_sizes.size());
  const int64_t dim = check_x(x);
  std::vector<Block> blocks;
  blocks.reserve(n);
  for (int64_t l = 0; l < n; l++)
    blocks.push_back(block_from(dim, norms[2 * l], norms[2 * l + 1], linears, 2 * kLinears * l, group_sizes,
                                k_caches[l], v_caches[l]));
  const int64_t pos = check_step(rope, input_pos, blocks[0]);
  for (const Block &b : blocks)
    TORCH_CHECK(b.max_len == blocks[0].max_len && b.head_dim == blocks[0].head_dim,
                "torchchat::decode_layers: every layer's cache must have the first one's length and head_dim");
  at::Tensor h = x.reshape({dim}).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);  // (dim,), updated in place
  const bool bf16 = x.scalar_type() == at::kBFloat16;  // round as the modules do (see round_bf16)
  for (const Block &b : blocks)
    run_block(b, h.data_ptr<float>(), rope.data_ptr<float>(), pos, static_cast<float>(eps), bf16);
  return h.view(x.sizes()).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchchat, m) {
  m.def("decode_layers(Tensor x, Tensor[] norms, float eps, Tensor?[] linears, int[] group_sizes, "
        "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor rope, Tensor input_pos) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchchat, CPU, m) {
  m.impl("decode_layers", &decode_layers);
}

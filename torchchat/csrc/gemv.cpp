// torch.ops.torchchat.gemv(x, weight, scale=None): y = (x @ weight.T) * scale for ONE row x, on CPU.
//
// Why: at batch 1 a decode step is bound by streaming the weights from memory. On AVX2 CPUs torch's
// own paths fall short of that: MKL's float32 matrix-vector product runs on one thread, oneDNN's
// bfloat16 one (no native bf16 instructions) and Inductor's fused loop convert bf16 at about half
// the memory's rate. These loops read each weight once, convert it in registers and split the rows
// over torch's threads. A registered op, not a Python one: from Python it costs one dispatch
// (~9 us), where a torch.library.custom_op in Python costs ~50 us a call.
//
// x: (..., in) with one row, float32/bfloat16/float16; weight: (out, in) contiguous, float32,
// bfloat16 or int8; scale: (out,) or None. Returns (..., out) in x's dtype; sums in float32.
// Built by torchchat/cpu_kernels.py with -mavx2 -mfma.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kGrainRows = 64;  // rows per thread at least: tiny matrices stay on one thread

inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const c10::BFloat16 *p) {
  // bf16 -> float32: widen each 16-bit value to 32 bits and shift it into the high half
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline __m256 load8(const int8_t *p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(p))));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

template <typename T>
float dot_row(const float *x, const T *row, int64_t n_in) {
  // 4 independent accumulators hide the FMA latency; one row after another, so a thread's rows are
  // one sequential stream for the hardware prefetcher (short rows read as 4 interleaved streams
  // measured at half the rate for SmolLM2's 576 columns).
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  int64_t i = 0;
  for (; i + 32 <= n_in; i += 32) {
    acc0 = _mm256_fmadd_ps(load8(row + i), _mm256_loadu_ps(x + i), acc0);
    acc1 = _mm256_fmadd_ps(load8(row + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(load8(row + i + 16), _mm256_loadu_ps(x + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(load8(row + i + 24), _mm256_loadu_ps(x + i + 24), acc3);
  }
  for (; i + 8 <= n_in; i += 8) acc0 = _mm256_fmadd_ps(load8(row + i), _mm256_loadu_ps(x + i), acc0);
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < n_in; i++) sum += x[i] * static_cast<float>(row[i]);
  return sum;
}

template <typename T>
void gemv_typed(const float *x, const T *w, const float *scale, float *y, int64_t n_out, int64_t n_in) {
  at::parallel_for(0, n_out, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; o++) {
      const float sum = dot_row(x, w + o * n_in, n_in);
      y[o] = scale ? sum * scale[o] : sum;
    }
  });
}

at::Tensor gemv(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &scale) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "torchchat::gemv: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "torchchat::gemv: weight must be (out, in), contiguous");
  TORCH_CHECK(x.numel() == x.size(-1) && x.size(-1) == weight.size(1),
              "torchchat::gemv: x must be one row of ", weight.size(1), " values, got ", x.sizes());
  const int64_t n_out = weight.size(0), n_in = weight.size(1);
  const at::Tensor x32 = x.reshape({n_in}).to(at::kFloat).contiguous();  // (in,)
  std::optional<at::Tensor> scale32;
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == n_out, "torchchat::gemv: scale must have ", n_out, " values");
    scale32 = scale->reshape({n_out}).to(at::kFloat).contiguous();  // (out,)
  }
  const float *s = scale32 ? scale32->data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({n_out}, x.options().dtype(at::kFloat));  // (out,)
  switch (weight.scalar_type()) {
    case at::kFloat:
      gemv_typed(x32.data_ptr<float>(), weight.data_ptr<float>(), s, y.data_ptr<float>(), n_out, n_in);
      break;
    case at::kBFloat16:
      gemv_typed(x32.data_ptr<float>(), weight.data_ptr<c10::BFloat16>(), s, y.data_ptr<float>(), n_out, n_in);
      break;
    case at::kChar:
      gemv_typed(x32.data_ptr<float>(), weight.data_ptr<int8_t>(), s, y.data_ptr<float>(), n_out, n_in);
      break;
    default:
      TORCH_CHECK(false, "torchchat::gemv: weight dtype ", weight.scalar_type(), " is not float32, bfloat16 or int8");
  }
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n_out;
  return y.view(sizes).to(x.scalar_type());  // (..., out)
}

}  // namespace

TORCH_LIBRARY(torchchat, m) { m.def("gemv(Tensor x, Tensor weight, Tensor? scale=None) -> Tensor"); }

TORCH_LIBRARY_IMPL(torchchat, CPU, m) { m.impl("gemv", &gemv); }

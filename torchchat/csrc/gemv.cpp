// torch.ops.torchchat.gemv(x, weight, scale=None): y = (x @ weight.T) * scale for a few rows of x (a decode step's
// sequences), on CPU.
//
// Why: at batch 1 a decode step is bound by streaming the weights from memory. On AVX2 CPUs torch's
// own paths fall short of that: MKL's float32 matrix-vector product runs on one thread, oneDNN's
// bfloat16 one (no native bf16 instructions) and Inductor's fused loop convert bf16 at about half
// the memory's rate. These loops read each weight once, convert it in registers and split the rows
// over torch's threads. A registered op, not a Python one: from Python it costs one dispatch
// (~9 us), where a torch.library.custom_op in Python costs ~50 us a call.
//
// Batches: each weight row is read from memory once and multiplied by every row of x while it is in L1, so a step
// of R sequences streams the weights once, not R times; each output row is bit-identical to the one-row call on
// that row (gemv_rows.h), so a sequence's result does not depend on the others in its batch. Any R is computed;
// torchchat.cpu.kernels.supports says up to how many rows this beats torch's GEMM (MAX_GEMV_ROWS).
//
// x: (..., in), R = numel / in rows, float32/bfloat16/float16; weight: (out, in) contiguous, float32,
// bfloat16 or int8; scale: (out,) or None, y[o] *= scale[o]; or, for an int8 weight, (out, in / 32) float16, a
// scale a block of 32 (W[o, i] = weight[o, i] * scale[o, i / 32]: llama.cpp's Q8_0, quantize.Int8Linear's block
// form). Returns (..., out) in x's dtype; sums in float32 (int8, either form: each row of x in int16 with its own
// scale, see gemv_rows.h).
// Built by torchchat/cpu/kernels.py with -mavx2 -mfma -mf16c. gemv_int4, for 4-bit weights, is below; the
// row kernels are in gemv_rows.h, the row loop (multiply, shared with decode_layers.cpp) in linear_rows.h.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include "gemv_rows.h"
#include "linear_rows.h"

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

using namespace torchchat_cpu;

// x32 (R, in) float32 times w: (..., out) in x's shape and dtype.
at::Tensor multiply_rows(const at::Tensor &x32, const at::Tensor &x, const LinearWeight &w) {
  const int64_t n_rows = x32.size(0);
  at::Tensor y = at::empty({n_rows, w.n_out}, x.options().dtype(at::kFloat));  // (R, out)
  // one row (a decode step outside decode_layers: a TP rank's): the pool; several (a short prompt, a verification
  // step of speculative decoding) come between torch's ops: torch's threads (linear_rows.h, RowThreads)
  multiply(x32.data_ptr<float>(), n_rows, w.n_in, std::array<Product, 1>{{{&w, y.data_ptr<float>(), w.n_out}}},
           n_rows == 1 ? RowThreads::kPool : RowThreads::kTorch);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = w.n_out;
  return y.view(sizes).to(x.scalar_type());  // (..., out)
}

at::Tensor gemv(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &scale) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "torchchat::gemv: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "torchchat::gemv: weight must be (out, in), contiguous");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1) && x.numel() > 0,
              "torchchat::gemv: x must be rows of ", weight.size(1), " values, got ", x.sizes());
  const int64_t n_out = weight.size(0), n_in = weight.size(1), n_rows = x.numel() / n_in;
  const at::Tensor x32 = x.reshape({n_rows, n_in}).to(at::kFloat).contiguous();  // (R, in)
  const at::ScalarType dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kChar,
              "torchchat::gemv: weight dtype ", dtype, " is not float32, bfloat16 or int8");
  LinearWeight w{dtype, weight.data_ptr()};
  w.n_out = n_out;
  w.n_in = n_in;
  std::optional<at::Tensor> scale32;
  if (dtype == at::kChar && scale.has_value() && scale->dim() == 2 && scale->scalar_type() == at::kHalf) {
    TORCH_CHECK(n_in % 32 == 0 && scale->size(0) == n_out && scale->size(1) == n_in / 32 && scale->is_contiguous(),
                "torchchat::gemv: block scales of an int8 (", n_out, ", ", n_in, ") weight must be (", n_out, ", ",
                n_in / 32, ") float16, contiguous, for blocks of 32 inputs; got ", scale->sizes());
    w.block_scales = scale->data_ptr<c10::Half>();
  } else if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == n_out, "torchchat::gemv: scale must have ", n_out, " values");
    scale32 = scale->reshape({n_out}).to(at::kFloat).contiguous();  // (out,)
    w.row_scale = scale32->data_ptr<float>();
  }
  return multiply_rows(x32, x, w);
}

// ----- int4: torch.ops.torchchat.gemv_int4(x, packed, scales_and_mins, group_size): see gemv_rows.h for the
// layout and the kernels -----

at::Tensor gemv_int4(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scales_and_mins,
                     int64_t group_size) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "torchchat::gemv_int4: CPU tensors only");
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte,
              "torchchat::gemv_int4: packed must be (out, in / 2) uint8, contiguous");
  const int64_t n_out = packed.size(0), n_in = 2 * packed.size(1);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && n_in % group_size == 0,
              "torchchat::gemv_int4: group_size (", group_size, ") must be a multiple of 32 that divides ", n_in);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == n_in && x.numel() > 0,
              "torchchat::gemv_int4: x must be rows of ", n_in, " values, got ", x.sizes());
  const int64_t n_groups = n_in / group_size;
  TORCH_CHECK(scales_and_mins.scalar_type() == at::kHalf && scales_and_mins.is_contiguous() &&
                  scales_and_mins.numel() == n_out * n_groups * 2,
              "torchchat::gemv_int4: scales_and_mins must be (", n_out, ", ", n_groups, ", 2) float16, contiguous");
  const at::Tensor x32 = x.reshape({x.numel() / n_in, n_in}).to(at::kFloat).contiguous();  // (R, in)
  const LinearWeight w{at::kByte, packed.data_ptr(), nullptr, scales_and_mins.data_ptr<c10::Half>(), group_size, n_out,
                       n_in};
  return multiply_rows(x32, x, w);
}

// torch.ops.torchchat.dequantize_int4(packed, scales_and_mins, group_size) -> (out, in) float32: W of the
// layout above, for a prompt's float32 GEMM. Why: unpacking with torch's elementwise ops is ~7 passes over
// the weight (~5-10 ns a weight); this is one.
at::Tensor dequantize_int4(const at::Tensor &packed, const at::Tensor &scales_and_mins, int64_t group_size) {
  TORCH_CHECK(packed.device().is_cpu() && packed.dim() == 2 && packed.is_contiguous() &&
                  packed.scalar_type() == at::kByte,
              "torchchat::dequantize_int4: packed must be (out, in / 2) uint8, contiguous, on CPU");
  const int64_t n_out = packed.size(0), n_in = 2 * packed.size(1);
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && n_in % group_size == 0,
              "torchchat::dequantize_int4: group_size (", group_size, ") must be a multiple of 32 that divides ", n_in);
  const int64_t n_groups = n_in / group_size;
  TORCH_CHECK(scales_and_mins.scalar_type() == at::kHalf && scales_and_mins.is_contiguous() &&
                  scales_and_mins.numel() == n_out * n_groups * 2,
              "torchchat::dequantize_int4: scales_and_mins must be (", n_out, ", ", n_groups, ", 2) float16, contiguous");
  at::Tensor w = at::empty({n_out, n_in}, packed.options().dtype(at::kFloat));  // (out, in)
  const LinearWeight weight{at::kByte, packed.data_ptr(), nullptr, scales_and_mins.data_ptr<c10::Half>(), group_size,
                            n_out, n_in};
  float *wp = w.data_ptr<float>();
  // torch's threads, not the pool: torch's GEMM runs next, on them (work_pool.h's workers would wait for cores that
  // OpenMP's threads are spinning on between the two)
  at::parallel_for(0, n_out, 16, [&](int64_t begin, int64_t end) { weight.float_rows(begin, end, wp + begin * n_in); });
  return w;
}

}  // namespace

TORCH_LIBRARY(torchchat, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? scale=None) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor packed, Tensor scales_and_mins, int group_size) -> Tensor");
  m.def("dequantize_int4(Tensor packed, Tensor scales_and_mins, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchchat, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("dequantize_int4", &dequantize_int4);
}

// torch.ops.torchchat.prompt_linear(x, weight, aux=None, group_size=0): y = x @ W.T for many rows of x (a prompt,
// a scored text), W in any format the row kernels take (linear_rows.h linear_weight: float32, bfloat16, int8 with
// row or block scales, 4-bit), on CPU. x: (..., in); returns (..., out) in x's dtype, computed in float32.
//
// Why (issue "CPU decode that holds its speed on a busy machine"): torch's GEMM (MKL) splits its work statically
// over OpenMP's threads, so beside one CPU hog a SmolLM2 prompt ran at 0.36 of its quiet speed, below what one
// thread alone does. Here W's rows are cut into chunks that the kernels' pool hands out one at a time
// (work_pool.h): each chunk is one single-threaded MKL GEMM of every row of x by the chunk's rows of W (converted
// to float32 first where W is not, a chunk at a time: the copy stays in cache, and memory stays bounded for a
// 128k-row output layer). A thread that runs takes more chunks; one the OS has descheduled holds up only the chunk
// it is computing.
//
// The tiles depend on the shapes and on the pool's busy judgement (finer on a busy machine), never on the thread
// count; each output is one GEMM call's sum over all of in, whichever thread runs its tile. With torch's MKL the
// bits are F.linear's whatever the tiles (tests/test_prompt_linear.py checks 1-3 threads, late workers and the busy
// tiles bit for bit).
//
// MKL: sgemm_ and MKL_Set_Num_Threads_Local come from torch's own library, declared weak: with a torch built
// without MKL they are null, prompt_linear_available() is false and torchchat.cpu uses torch's GEMM.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "linear_rows.h"
#include "work_pool.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

extern "C" {
void sgemm_(const char *transa, const char *transb, const int *m, const int *n, const int *k, const float *alpha,
            const float *a, const int *lda, const float *b, const int *ldb, const float *beta, float *c,
            const int *ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));  // mkl_service.h's mkl_set_num_threads_local (C)
}

namespace {

using namespace torchchat_cpu;

// A chunk is a tile: up to kXTile rows of x by rows of W worth about kChunkMacs multiply-adds (~100 us of one core's
// GEMM, so the pool's claim and a woken worker's start, microseconds, are small beside it), at least kMinWTile rows,
// whole multiples of kChunkAlign (the GEMM's register tile). Smaller W tiles cost MKL's per-call packing (32 rows:
// 1.02-1.09x the time of MKL's own threading on SmolLM2's shapes, 96: 0.97-1.01x), so only a busy machine gets
// them (kBusyWTile). A SmolLM2 projection of a 512-token prompt is 2-16 tiles quiet, 6-48 busy.
constexpr int64_t kChunkMacs = 8'000'000, kChunkAlign = 16, kXTile = 512, kMinWTile = 96,
                  kBusyWTile = 32;

bool prompt_linear_available() { return sgemm_ != nullptr && MKL_Set_Num_Threads_Local != nullptr; }

at::Tensor prompt_linear(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &aux,
                         int64_t group_size) {
  TORCH_CHECK(prompt_linear_available(), "torchchat::prompt_linear: this torch has no MKL");
  TORCH_CHECK(x.device().is_cpu(), "torchchat::prompt_linear: CPU tensors only");
  const LinearWeight w = linear_weight(weight, aux, group_size, "torchchat::prompt_linear", "weight");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.n_in && x.numel() > 0,
              "torchchat::prompt_linear: x must be rows of ", w.n_in, " values, got ", x.sizes());
  const int64_t n_rows = x.numel() / w.n_in;
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK(n_rows <= kMaxInt && w.n_out <= kMaxInt && w.n_in <= kMaxInt,
              "torchchat::prompt_linear: shapes past 2^31 (MKL's int sizes)");
  const at::Tensor x32 = x.reshape({n_rows, w.n_in}).to(at::kFloat).contiguous();  // (R, in)
  at::Tensor y = at::empty({n_rows, w.n_out}, x.options().dtype(at::kFloat));         // (R, out)
  const float *xp = x32.data_ptr<float>();
  float *yp = y.data_ptr<float>();
  // chunk (i, j): rows [i * x_tile, ...) of x by rows [j * w_tile, ...) of W, numbered j fastest
  const int64_t x_tile = std::min(n_rows, kXTile);
  // W's tiles: about kChunkMacs a chunk, at least kMinWTile rows, an even count (two threads, the common case, end
  // together on a quiet machine); on a busy machine (the pool's judge) kBusyWTile rows, so that a thread the OS
  // has descheduled holds up little of a region and the others take the rest
  const bool busy = work_pool().busy();
  const int64_t target = busy ? kBusyWTile : std::max(kMinWTile, kChunkMacs / (x_tile * w.n_in));
  const int64_t w_tiles_even = ((w.n_out + target - 1) / target + 1) / 2 * 2;
  const int64_t w_tile = ((w.n_out + w_tiles_even - 1) / w_tiles_even + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  const int64_t x_tiles = (n_rows + x_tile - 1) / x_tile, w_tiles = (w.n_out + w_tile - 1) / w_tile;
  parallel_chunks(
      x_tiles * w_tiles, 1,
      [&](int64_t first, int64_t last) {
        thread_local std::vector<float> converted;  // the chunk's rows of W in float32, for non-float32 W
        const int previous = MKL_Set_Num_Threads_Local(1);  // this thread's GEMM on this thread alone
        for (int64_t c = first; c < last; c++) {
          const int64_t r0 = c / w_tiles * x_tile, o0 = c % w_tiles * w_tile;
          const int64_t r1 = std::min(n_rows, r0 + x_tile), o1 = std::min(w.n_out, o0 + w_tile);
          const float *a = w.float_data();
          if (a != nullptr) {
            a += o0 * w.n_in;
          } else {
            converted.resize((o1 - o0) * w.n_in);
            w.float_rows(o0, o1, converted.data());
            a = converted.data();
          }
          // y[r0:r1, o0:o1] = x[r0:r1] @ W[o0:o1].T, column-major: C (o1 - o0, r1 - r0) = A^T (W's rows) B (x's rows)
          const int m = static_cast<int>(o1 - o0), n = static_cast<int>(r1 - r0), k = static_cast<int>(w.n_in),
                    ldc = static_cast<int>(w.n_out);
          const float one = 1.0f, zero = 0.0f;
          sgemm_("T", "N", &m, &n, &k, &one, a, &k, xp + r0 * w.n_in, &k, &zero, yp + r0 * w.n_out + o0, &ldc);
        }
        MKL_Set_Num_Threads_Local(previous);
      },
      /*long_chunks=*/true);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = w.n_out;
  return y.view(sizes).to(x.scalar_type());  // (..., out)
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchchat, m) {
  m.def("prompt_linear(Tensor x, Tensor weight, Tensor? aux=None, int group_size=0) -> Tensor");
  m.def("prompt_linear_available() -> bool", &prompt_linear_available);
}

TORCH_LIBRARY_IMPL(torchchat, CPU, m) { m.impl("prompt_linear", &prompt_linear); }

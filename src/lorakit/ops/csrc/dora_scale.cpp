// DoRA's output scaling for bf16 training on the CPU, one pass each way. `(y * scale).to(bf16)` on a bf16 output y
// and an fp32 scale (one value per output column, m / ||W0 + s B A||) runs PyTorch's mixed-dtype loop into an fp32
// temporary and a cast, and its backward four more such passes; that was most of what DoRA added to a LoRA step.
//
//   scale_columns(y, scale)                        out = bf16(float(y) * scale)   (bit for bit PyTorch's)
//   scale_columns_bwd(grad, y, scale, need_scale)  dy = bf16(float(grad) * scale) (bit for bit PyTorch's);
//                                                  dscale[j] = sum over rows of float(grad) * float(y), in fp32
//                                                  partial sums per thread (equal to fp32 rounding)
//
// Inputs: contiguous bf16 CPU tensors y and grad (rows, D), scale a contiguous fp32 (D). Built into lorakit_cpu.cpp
// by lorakit/ops/cpu_extension.py; used by lorakit/ops/column_scale.py.
#include "cpu_capability.h"
#include "bf16_rows.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>
#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace lorakit_dora {

using namespace lorakit_bf16_rows;
constexpr int64_t kGrain = 16384;  // elements per parallel task
constexpr int64_t kRowBlock = 4;   // rows whose dscale partial sums stay in registers

void check(const Tensor& y, const Tensor& scale, const char* name) {
  check_bf16(y, name);
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
              scale.dim() == 1 && y.dim() >= 1 && scale.size(0) == y.size(-1),
              "scale must be a contiguous fp32 CPU vector as long as the last dimension of ", name);
}

// out[r, j] = bf16(float(in[r, j]) * scale[j]) for rows [begin, end)
void scale_rows(const BFloat16* in, const float* sp, BFloat16* out, int64_t D, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const BFloat16* src = in + r * D;
    BFloat16* dst = out + r * D;
    for (int64_t j = 0; j < D; j += kB) {
      const int64_t m = std::min(kB, D - j), m0 = std::min(kF, m), m1 = std::max<int64_t>(m - kF, 0);
      auto [a, b] = to_float(load(src + j, m));
      Vec s0 = Vec::loadu(sp + j, m0), s1 = m1 ? Vec::loadu(sp + j + kF, m1) : Vec(0.0f);
      store(to_bf16(a * s0, b * s1), dst + j, m);
    }
  }
}

Tensor scale_columns(const Tensor& y, const Tensor& scale) {
  check(y, scale, "y");
  const int64_t D = y.size(-1), rows = y.numel() / std::max<int64_t>(D, 1);
  Tensor out = at::empty_like(y);
  const BFloat16* yp = y.data_ptr<BFloat16>();
  const float* sp = scale.data_ptr<float>();
  BFloat16* op = out.data_ptr<BFloat16>();
  for_rows(rows, D, kGrain, [&](int64_t begin, int64_t end) { scale_rows(yp, sp, op, D, begin, end); });
  return out;
}

std::tuple<Tensor, std::optional<Tensor>> scale_columns_bwd(const Tensor& grad, const Tensor& y, const Tensor& scale,
                                                            bool need_scale) {
  check(grad, scale, "grad");
  check(y, scale, "y");
  TORCH_CHECK(grad.sizes() == y.sizes(), "scale_columns_bwd: grad and y must have one shape");
  const int64_t D = y.size(-1), rows = y.numel() / std::max<int64_t>(D, 1);
  Tensor dy = at::empty_like(y);
  const int threads = at::get_num_threads();
  std::vector<float> parts(need_scale ? static_cast<size_t>(threads) * D : 0, 0.0f);
  const BFloat16* gp = grad.data_ptr<BFloat16>();
  const BFloat16* yp = y.data_ptr<BFloat16>();
  const float* sp = scale.data_ptr<float>();
  BFloat16* dp = dy.data_ptr<BFloat16>();
  for_rows(rows, D, kGrain, [&](int64_t begin, int64_t end) {
    if (!need_scale) return scale_rows(gp, sp, dp, D, begin, end);
    float* acc = parts.data() + static_cast<size_t>(at::get_thread_num()) * D;
    // one read of grad for dy and dscale; the partial sums stay in registers over kRowBlock rows (the same order of
    // additions as one row at a time)
    for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
      const int64_t r1 = std::min(end, r0 + kRowBlock);
      for (int64_t j = 0; j < D; j += kB) {
        const int64_t m = std::min(kB, D - j), m0 = std::min(kF, m), m1 = std::max<int64_t>(m - kF, 0);
        Vec s0 = Vec::loadu(sp + j, m0), s1 = m1 ? Vec::loadu(sp + j + kF, m1) : Vec(0.0f);
        Vec a0 = Vec::loadu(acc + j, m0), a1 = m1 ? Vec::loadu(acc + j + kF, m1) : Vec(0.0f);
        for (int64_t r = r0; r < r1; ++r) {
          auto [g0, g1] = to_float(load(gp + r * D + j, m));
          auto [y0, y1] = to_float(load(yp + r * D + j, m));
          store(to_bf16(g0 * s0, g1 * s1), dp + r * D + j, m);
          a0 = at::vec::fmadd(g0, y0, a0);
          a1 = at::vec::fmadd(g1, y1, a1);
        }
        a0.store(acc + j, m0);
        if (m1) a1.store(acc + j + kF, m1);
      }
    }
  });
  std::optional<Tensor> dscale;
  if (need_scale) {
    Tensor total = at::zeros({D}, scale.options());
    float* tp = total.data_ptr<float>();
    for (int t = 0; t < threads; ++t)
      for (int64_t j = 0; j < D; ++j) tp[j] += parts[static_cast<size_t>(t) * D + j];
    dscale = total;
  }
  return {dy, dscale};
}

}  // namespace lorakit_dora

TORCH_LIBRARY_FRAGMENT(lorakit, m) {
  m.def("scale_columns(Tensor y, Tensor scale) -> Tensor");
  m.def("scale_columns_bwd(Tensor grad, Tensor y, Tensor scale, bool need_scale) -> (Tensor, Tensor?)");
}

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("scale_columns", lorakit_dora::scale_columns);
  m.impl("scale_columns_bwd", lorakit_dora::scale_columns_bwd);
}

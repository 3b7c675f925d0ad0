// RMSNorm for bf16 training on the CPU: its normalisation and its backward, each in one pass over each row where
// PyTorch's operators (ops/rms_norm.py) take 3-4 and ~14 (fp32 copies, products, casts, a mean, a sum: each a pass
// of its own):
//
//   rms_norm_apply(x, rstd, w)        y = bf16(w32 * bf16(x32 * rstd)): the forward's output from its 1 / rms (and
//                                     its recomputation for the backward), the operations of ops/rms_norm.py in
//                                     their order (the same result bit for bit)
//   rms_norm_bwd(dy, x, rstd, w)      n = x32 * rstd, g = dy32 * w32; dx = bf16(rstd * (g - n * mean(g * n)));
//                                     dw = sum over rows of dy32 * bf16(n): the fp32 math of ops/rms_norm.py, in
//                                     another order of additions (equal to fp32 rounding)
//
// Inputs: contiguous bf16 CPU tensors dy and x (rows, D), w (D); rstd fp32, one value per row (the forward's).
// (x * rstd rounds once to fp32, and the product of two bf16 values is exact in fp32, so both roundings are
// PyTorch's.)
// dw is summed in fp32 per thread. Built into lorakit_cpu.cpp by lorakit/ops/cpu_extension.py; used by
// lorakit/ops/rms_norm.py.
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

namespace lorakit_rms_norm {

using namespace lorakit_bf16_rows;
constexpr int64_t kGrain = 2048;  // elements per parallel task (small tensors stay on one thread)

void check_rows(const Tensor& x, const Tensor& rstd, const Tensor& weight, const char* op) {
  check_bf16(x, "x"); check_bf16(weight, "weight");
  const int64_t D = x.size(-1);
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() * D == x.numel() &&
              weight.numel() == D, op, ": shapes do not match");
}

Tensor rms_norm_apply(const Tensor& x, const Tensor& rstd, const Tensor& weight) {
  check_rows(x, rstd, weight, "rms_norm_apply");
  const int64_t D = x.size(-1), rows = x.numel() / std::max<int64_t>(D, 1);
  Tensor y = at::empty_like(x);
  const BFloat16* xp = x.data_ptr<BFloat16>();
  const BFloat16* wp = weight.data_ptr<BFloat16>();
  const float* rp = rstd.data_ptr<float>();
  BFloat16* yp = y.data_ptr<BFloat16>();
  for_rows(rows, D, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Vec scale(rp[r]);
      for (int64_t j = 0; j < D; j += kB) {
        const int64_t m = std::min(kB, D - j);
        auto [x0, x1] = to_float(load(xp + r * D + j, m));
        auto [w0, w1] = to_float(load(wp + j, m));
        auto [n0, n1] = to_float(to_bf16(x0 * scale, x1 * scale));
        store(to_bf16(w0 * n0, w1 * n1), yp + r * D + j, m);
      }
    }
  });
  return y;
}

std::tuple<Tensor, std::optional<Tensor>> rms_norm_bwd(const Tensor& dy, const Tensor& x, const Tensor& rstd,
                                                       const Tensor& weight, bool weight_grad) {
  check_bf16(dy, "grad");
  check_rows(x, rstd, weight, "rms_norm_bwd");
  TORCH_CHECK(dy.sizes() == x.sizes(), "rms_norm_bwd: grad and x must have one shape");
  const int64_t D = x.size(-1), rows = x.numel() / std::max<int64_t>(D, 1);
  Tensor dx = at::empty_like(x);
  const int threads = at::get_num_threads();
  std::vector<float> dw_parts(weight_grad ? static_cast<size_t>(threads) * D : 0, 0.0f);
  std::vector<float> w32(D);
  at::vec::convert(weight.data_ptr<BFloat16>(), w32.data(), D);
  const BFloat16* gp = dy.data_ptr<BFloat16>();
  const BFloat16* xp = x.data_ptr<BFloat16>();
  const float* rp = rstd.data_ptr<float>();
  BFloat16* dxp = dx.data_ptr<BFloat16>();
  for_rows(rows, D, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> n(D), g(D), dy32(D);
    float* dw = weight_grad ? dw_parts.data() + static_cast<size_t>(at::get_thread_num()) * D : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      at::vec::convert(xp + r * D, n.data(), D);
      at::vec::convert(gp + r * D, dy32.data(), D);
      const Vec scale(rp[r]);
      Vec acc(0.0f);
      float tail = 0.0f;
      int64_t j = 0;
      for (; j + kF <= D; j += kF) {
        Vec nv = Vec::loadu(n.data() + j) * scale, gv = Vec::loadu(dy32.data() + j) * Vec::loadu(w32.data() + j);
        nv.store(n.data() + j); gv.store(g.data() + j);
        acc = at::vec::fmadd(gv, nv, acc);
      }
      for (; j < D; ++j) { n[j] *= rp[r]; g[j] = dy32[j] * w32[j]; tail += g[j] * n[j]; }
      const float mean = (at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc) + tail) / D;
      const Vec meanv(mean);
      for (j = 0; j < D; j += kB) {  // dx in bf16; dw's fp32 partial sums
        const int64_t m = std::min(kB, D - j);
        const int64_t m0 = std::min(kF, m), m1 = std::max<int64_t>(m - kF, 0);
        Vec n0 = Vec::loadu(n.data() + j, m0), g0 = Vec::loadu(g.data() + j, m0);
        Vec n1 = m1 ? Vec::loadu(n.data() + j + kF, m1) : Vec(0.0f);
        Vec g1 = m1 ? Vec::loadu(g.data() + j + kF, m1) : Vec(0.0f);
        store(to_bf16(scale * (g0 - n0 * meanv), scale * (g1 - n1 * meanv)), dxp + r * D + j, m);
        if (dw) {
          auto [b0, b1] = to_float(to_bf16(n0, n1));  // normed.to(x.dtype)
          Vec d0 = Vec::loadu(dy32.data() + j, m0), p0 = Vec::loadu(dw + j, m0);
          (p0 + d0 * b0).store(dw + j, m0);
          if (m1) {
            Vec d1 = Vec::loadu(dy32.data() + j + kF, m1), p1 = Vec::loadu(dw + j + kF, m1);
            (p1 + d1 * b1).store(dw + j + kF, m1);
          }
        }
      }
    }
  });
  std::optional<Tensor> dweight;
  if (weight_grad) {
    Tensor total = at::zeros({D}, x.options().dtype(at::kFloat));
    float* tp = total.data_ptr<float>();
    for (int t = 0; t < threads; ++t)
      for (int64_t j = 0; j < D; ++j) tp[j] += dw_parts[static_cast<size_t>(t) * D + j];
    dweight = total.to(weight.scalar_type());
  }
  return {dx, dweight};
}

}  // namespace lorakit_rms_norm

TORCH_LIBRARY_FRAGMENT(lorakit, m) {
  m.def("rms_norm_apply(Tensor x, Tensor rstd, Tensor weight) -> Tensor");
  m.def("rms_norm_bwd(Tensor grad, Tensor x, Tensor rstd, Tensor weight, bool weight_grad) -> (Tensor, Tensor?)");
}

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("rms_norm_apply", lorakit_rms_norm::rms_norm_apply);
  m.impl("rms_norm_bwd", lorakit_rms_norm::rms_norm_bwd);
}

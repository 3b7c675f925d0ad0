// RMSNorm for training on the CPU, bf16 and fp32: its normalisation and its backward, each in one pass over each
// row where PyTorch's operators (ops/rms_norm.py) take 2-4 and ~14 (fp32 copies, products, casts, a mean, a sum:
// each a pass of its own). Written for bf16 below; in fp32 the casts are none (T(v) = v):
//
//   rms_norm_apply(x, rstd, w)        y = T(w32 * T(x32 * rstd)): the forward's output from its 1 / rms (and
//                                     its recomputation for the backward), the operations of ops/rms_norm.py in
//                                     their order (the same result bit for bit)
//   rms_norm_bwd(dy, x, rstd, w)      n = x32 * rstd, g = dy32 * w32; dx = T(rstd * (g - n * mean(g * n)));
//                                     dw = sum over rows of dy32 * T(n): the fp32 math of ops/rms_norm.py, in
//                                     another order of additions (equal to fp32 rounding)
//
// Inputs: contiguous CPU tensors dy and x (rows, D), w (D), all bf16 or all fp32; rstd fp32, one value per row (the
// forward's).
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
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && x.is_contiguous() && weight.is_contiguous() &&
              (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
              weight.scalar_type() == x.scalar_type(), op,
              ": x and weight must be contiguous CPU tensors, both bf16 or both fp32");
  const int64_t D = x.size(-1);
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() * D == x.numel() &&
              weight.numel() == D, op, ": shapes do not match");
}

template <typename T>
void apply_rows(const T* xp, const float* rp, const T* wp, T* yp, int64_t D, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const Vec scale(rp[r]);
    for (int64_t j = 0; j < D; j += kB) {
      const int64_t m = std::min(kB, D - j);
      auto [x0, x1] = load2(xp + r * D + j, m);
      auto [w0, w1] = load2(wp + j, m);
      auto [n0, n1] = round_as(x0 * scale, x1 * scale, xp);
      store2(w0 * n0, w1 * n1, yp + r * D + j, m);
    }
  }
}

Tensor rms_norm_apply(const Tensor& x, const Tensor& rstd, const Tensor& weight) {
  check_rows(x, rstd, weight, "rms_norm_apply");
  const int64_t D = x.size(-1), rows = x.numel() / std::max<int64_t>(D, 1);
  Tensor y = at::empty_like(x);
  const float* rp = rstd.data_ptr<float>();
  for_rows(rows, D, kGrain, [&](int64_t begin, int64_t end) {
    if (x.scalar_type() == at::kFloat)
      apply_rows(x.data_ptr<float>(), rp, weight.data_ptr<float>(), y.data_ptr<float>(), D, begin, end);
    else
      apply_rows(x.data_ptr<BFloat16>(), rp, weight.data_ptr<BFloat16>(), y.data_ptr<BFloat16>(), D, begin, end);
  });
  return y;
}

template <typename T>
std::tuple<Tensor, std::optional<Tensor>> backward(const Tensor& dy, const Tensor& x, const Tensor& rstd,
                                                   const Tensor& weight, bool weight_grad) {
  const int64_t D = x.size(-1), rows = x.numel() / std::max<int64_t>(D, 1);
  Tensor dx = at::empty_like(x);
  const int threads = at::get_num_threads();
  std::vector<float> dw_parts(weight_grad ? static_cast<size_t>(threads) * D : 0, 0.0f);
  std::vector<float> w32(D);
  at::vec::convert(weight.data_ptr<T>(), w32.data(), D);
  const T* gp = dy.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const float* rp = rstd.data_ptr<float>();
  T* dxp = dx.data_ptr<T>();
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
        store2(scale * (g0 - n0 * meanv), scale * (g1 - n1 * meanv), dxp + r * D + j, m);
        if (dw) {
          auto [b0, b1] = round_as(n0, n1, xp);  // normed.to(x.dtype)
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

std::tuple<Tensor, std::optional<Tensor>> rms_norm_bwd(const Tensor& dy, const Tensor& x, const Tensor& rstd,
                                                       const Tensor& weight, bool weight_grad) {
  check_rows(x, rstd, weight, "rms_norm_bwd");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous() && dy.is_cpu(),
              "rms_norm_bwd: grad must be a contiguous CPU tensor of x's shape and dtype");
  return x.scalar_type() == at::kFloat ? backward<float>(dy, x, rstd, weight, weight_grad)
                                       : backward<BFloat16>(dy, x, rstd, weight, weight_grad);
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

// silu(gate) * up, the gated activation of Llama-style MLPs, for training on the CPU in bf16 and fp32: the
// forward in one pass where PyTorch takes two operators (silu, mul), the backward in one where it takes three
// (mul, mul, silu_backward), each reading its inputs once and computing exp(-gate) once per element.
//
//   silu_mul(g, u)                        h = T(float(T(silu(g))) * float(u))             = F.silu(g) * u
//   silu_mul_bwd(dh, g, u, need_g, need_u)
//                                         du = T(float(dh) * float(T(silu(g))))           = dh * F.silu(g)
//                                         dg = T(float(T(dh * u)) * s * (1 + g * (1 - s))) = silu_backward(dh * u, g)
//
// with silu(x) = x / (1 + e), s = 1 / (1 + e), e = exp(-x): PyTorch's CPU kernels' formulas, in their order, on
// the same vectorised exp (ATen's Vectorized<float>::exp); T is bf16 (intermediates rounded where PyTorch stores
// them in bf16) or fp32 (no rounding). The work is split over the threads as PyTorch's elementwise loops split it
// (at::parallel_for over the flat tensor, grain 32768; in each part, vectors of 2 x Vectorized<T>::size() values,
// then std::exp for the part's last few), so the results equal PyTorch's bit for bit, tails included
// (tests/unit/test_fused_modules.py).
//
// Inputs: contiguous CPU tensors of one shape and one dtype (bf16 or fp32). Built into lorakit_cpu.cpp by
// lorakit/ops/cpu_extension.py; used by lorakit/ops/swiglu.py.
#include "cpu_capability.h"
#include "bf16_rows.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <cmath>
#include <optional>
#include <tuple>

namespace lorakit_swiglu {

using namespace lorakit_bf16_rows;
constexpr int64_t kGrain = 32768;  // at::internal::GRAIN_SIZE: PyTorch's elementwise loops' split

void check(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
              t.sizes() == like.sizes() && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat),
              "silu_mul: ", name, " must be a contiguous bf16 or fp32 CPU tensor of the gate's shape and dtype");
}

template <typename T>
constexpr int64_t vector_step() { return 2 * at::vec::Vectorized<T>::size(); }

// a value PyTorch stores in T, as the float its next operator reads
template <typename T>
inline float stored(float x) { return static_cast<float>(static_cast<T>(x)); }

// [begin, end) of the flat tensors, as PyTorch's loops do that part: whole vector steps, then scalars
template <typename T, typename V, typename S>
void for_part(int64_t begin, int64_t end, const V& vector_body, const S& scalar_body) {
  const int64_t vectors = begin + (end - begin) / vector_step<T>() * vector_step<T>();
  for (int64_t i = begin; i < vectors; i += kB) vector_body(i);
  for (int64_t i = vectors; i < end; ++i) scalar_body(i);
}

template <typename T>
void silu_mul_part(const T* g, const T* u, T* h, int64_t begin, int64_t end) {
  const Vec one(1.f);
  for_part<T>(begin, end, [&](int64_t i) {
    auto [g0, g1] = load2(g + i);
    auto [u0, u1] = load2(u + i);
    auto [s0, s1] = round_as(g0 / (one + g0.neg().exp()), g1 / (one + g1.neg().exp()), g);
    store2(s0 * u0, s1 * u1, h + i);
  }, [&](int64_t i) {
    const float x = static_cast<float>(g[i]);
    h[i] = static_cast<T>(stored<T>(x / (1.f + std::exp(-x))) * static_cast<float>(u[i]));
  });
}

template <typename T>
void silu_mul_bwd_part(const T* dh, const T* g, const T* u, T* dg, T* du, int64_t begin, int64_t end) {
  const Vec one(1.f);
  for_part<T>(begin, end, [&](int64_t i) {
    auto [d0, d1] = load2(dh + i);
    auto [g0, g1] = load2(g + i);
    const Vec e0 = g0.neg().exp(), e1 = g1.neg().exp();
    if (du) {
      auto [s0, s1] = round_as(g0 / (one + e0), g1 / (one + e1), g);
      store2(d0 * s0, d1 * s1, du + i);
    }
    if (dg) {
      auto [u0, u1] = load2(u + i);
      auto [p0, p1] = round_as(d0 * u0, d1 * u1, g);
      const Vec s0 = one / (one + e0), s1 = one / (one + e1);
      store2(p0 * s0 * (one + g0 * (one - s0)), p1 * s1 * (one + g1 * (one - s1)), dg + i);
    }
  }, [&](int64_t i) {
    const float d = static_cast<float>(dh[i]), x = static_cast<float>(g[i]);
    if (du) du[i] = static_cast<T>(d * stored<T>(x / (1.f + std::exp(-x))));
    if (dg) {
      const float p = stored<T>(d * static_cast<float>(u[i]));
      const float s = 1.f / (1.f + std::exp(-x));
      dg[i] = static_cast<T>(p * s * (1.f + x * (1.f - s)));
    }
  });
}

// PyTorch's split of a flat elementwise loop over the threads (TensorIterator::for_each)
template <typename F>
void for_parts(int64_t n, const F& body) {
  if (n < kGrain || at::get_num_threads() == 1) {
    body(0, n);
  } else {
    at::parallel_for(0, n, kGrain, body);
  }
}

Tensor silu_mul(const Tensor& gate, const Tensor& up) {
  check(gate, gate, "gate");
  check(up, gate, "up");
  Tensor out = at::empty_like(gate);
  const int64_t n = gate.numel();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    for_parts(n, [&](int64_t b, int64_t e) {
      silu_mul_part(gate.data_ptr<T>(), up.data_ptr<T>(), out.data_ptr<T>(), b, e);
    });
  };
  if (gate.scalar_type() == at::kFloat) run(float{}); else run(BFloat16{});
  return out;
}

std::tuple<std::optional<Tensor>, std::optional<Tensor>> silu_mul_bwd(const Tensor& grad, const Tensor& gate,
                                                                      const Tensor& up, bool need_gate,
                                                                      bool need_up) {
  check(gate, gate, "gate");
  check(up, gate, "up");
  check(grad, gate, "grad");
  std::optional<Tensor> dgate, dup;
  if (need_gate) dgate = at::empty_like(gate);
  if (need_up) dup = at::empty_like(up);
  const int64_t n = gate.numel();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    T* dg = need_gate ? dgate->data_ptr<T>() : nullptr;
    T* du = need_up ? dup->data_ptr<T>() : nullptr;
    for_parts(n, [&](int64_t b, int64_t e) {
      silu_mul_bwd_part(grad.data_ptr<T>(), gate.data_ptr<T>(), up.data_ptr<T>(), dg, du, b, e);
    });
  };
  if (gate.scalar_type() == at::kFloat) run(float{}); else run(BFloat16{});
  return {dgate, dup};
}

}  // namespace lorakit_swiglu

TORCH_LIBRARY_FRAGMENT(lorakit, m) {
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_mul_bwd(Tensor grad, Tensor gate, Tensor up, bool need_gate, bool need_up) -> (Tensor?, Tensor?)");
}

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("silu_mul", lorakit_swiglu::silu_mul);
  m.impl("silu_mul_bwd", lorakit_swiglu::silu_mul_bwd);
}

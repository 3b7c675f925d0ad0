// Rotary position embedding of the queries and keys for training on the CPU, bf16 or fp32, one pass each way
// (ops/rotary.py), where transformers' apply_rotary_pos_emb runs ~14 operators forward and autograd ~20 backward:
//
//   rotary_fwd(q, k, cos, sin)        x_out = r(r(x * cos) + r(rotate_half(x) * sin)) for x = q, k,
//                                     rotate_half(x) = (-x2, x1) for the halves (x1, x2) of the last dimension
//   rotary_bwd(dq, dk, cos, sin)      dx1 = r(r(dy1 * cos1) + r(dy2 * sin2)),
//                                     dx2 = r(r(dy2 * cos2) - r(dy1 * sin1)):  autograd's gradient of the
//                                     composition (each of its products and its sum rounds once)
//
// r() rounds to the tensors' dtype. Every value is computed with the operations of the composition in its order: in
// bf16 a product of two bf16 values is exact in fp32 before its one rounding, and the sum rounds to fp32, then to
// bf16, as PyTorch's add does; in fp32 each product and sum is one fp32 operation (never fused into one FMA:
// FloatValues::rounded). So the results are the composition's bit for bit. q, k, dq, dk: (B, heads, L, D) with
// any strides but a contiguous last dimension (q and k are transposed views of the projections' outputs); cos,
// sin: (B or 1, L, D) of the same dtype, contiguous last dimension. The outputs keep the inputs' memory order (q's
// for the forward; (B, L, heads, D), the projections' order, for the gradients). Built into lorakit_cpu.cpp by
// lorakit/ops/cpu_extension.py.
#include "cpu_capability.h"
#include "bf16_rows.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <tuple>

namespace lorakit_rotary {

using namespace lorakit_bf16_rows;
constexpr int64_t kGrain = 4096;  // elements per parallel task

// 32 values of a row as two float vectors and back (m <= kB of them at a row's tail), and each operation's
// rounding to the element type
struct Bf16Values {
  using T = BFloat16;
  static std::tuple<Vec, Vec> get(const T* p, int64_t m) { return to_float(load(p, m)); }
  static void put(const Vec& a, const Vec& b, T* p, int64_t m) { store(to_bf16(a, b), p, m); }
  static std::tuple<Vec, Vec> rounded(const Vec& a, const Vec& b) { return to_float(to_bf16(a, b)); }
};
struct FloatValues {
  using T = float;
  static std::tuple<Vec, Vec> get(const T* p, int64_t m) {
    return {Vec::loadu(p, std::min(m, kF)), m > kF ? Vec::loadu(p + kF, m - kF) : Vec(0.f)};
  }
  static void put(const Vec& a, const Vec& b, T* p, int64_t m) {
    a.store(p, std::min(m, kF));
    if (m > kF) b.store(p + kF, m - kF);
  }
  // Each product keeps its own rounding, as PyTorch's mul gives it: stored, and read back after a compiler
  // barrier, it cannot be fused with the sum that follows into one FMA (which -O3 -march=native would do).
  static std::tuple<Vec, Vec> rounded(const Vec& a, const Vec& b) {
    alignas(64) float products[2 * kF];
    a.store(products);
    b.store(products + kF);
    asm volatile("" : : "r"(products) : "memory");  // the array escapes: the compiler must store and reload it
    return {Vec::loadu(products), Vec::loadu(products + kF)};
  }
};

void check(const Tensor& x, const Tensor& cos, const Tensor& sin, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
              x.dim() == 4 && x.stride(3) == 1, name,
              " must be a bf16 or fp32 CPU tensor (B, heads, L, D) with a contiguous last dimension");
  for (const Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type() && t->dim() == 3 && t->stride(2) == 1 &&
                (t->size(0) == x.size(0) || t->size(0) == 1) && t->size(1) == x.size(2) && t->size(2) == x.size(3),
                "cos and sin must be CPU tensors (B or 1, L, D) of the dtype of ", name, ", matching it");
  }
  TORCH_CHECK(x.size(3) % 2 == 0, name, "'s last dimension must be even");
}

// one (b, head, l) row: out = rotated in, or its gradient when `backward`
template <typename V, bool backward>
void rotate_row(const typename V::T* in, typename V::T* out, const typename V::T* cp, const typename V::T* sp,
                int64_t half) {
  for (int64_t j = 0; j < half; j += kB) {
    const int64_t m = std::min(kB, half - j);
    auto [a0, a1] = V::get(in + j, m);         // x1 (dy1)
    auto [b0, b1] = V::get(in + half + j, m);  // x2 (dy2)
    auto [c10, c11] = V::get(cp + j, m);
    auto [c20, c21] = V::get(cp + half + j, m);
    auto [s10, s11] = V::get(sp + j, m);
    auto [s20, s21] = V::get(sp + half + j, m);
    auto [p0, p1] = V::rounded(a0 * c10, a1 * c11);  // x1 * cos1
    auto [q0, q1] = V::rounded(b0 * c20, b1 * c21);  // x2 * cos2
    if (!backward) {
      auto [r0, r1] = V::rounded(b0.neg() * s10, b1.neg() * s11);  // -x2 * sin1
      auto [t0, t1] = V::rounded(a0 * s20, a1 * s21);              // x1 * sin2
      V::put(p0 + r0, p1 + r1, out + j, m);
      V::put(q0 + t0, q1 + t1, out + half + j, m);
    } else {
      auto [r0, r1] = V::rounded(b0 * s20, b1 * s21);  // dy2 * sin2, to x1
      auto [t0, t1] = V::rounded(a0 * s10, a1 * s11);  // dy1 * sin1, negated, to x2
      V::put(p0 + r0, p1 + r1, out + j, m);
      V::put(q0 + t0.neg(), q1 + t1.neg(), out + half + j, m);
    }
  }
}

// out[b, h, l] = rotate_row(in[b, h, l]) over all rows
template <typename V, bool backward>
void rotate_as(const Tensor& in, const Tensor& out, const Tensor& cos, const Tensor& sin) {
  using T = typename V::T;
  const int64_t B = in.size(0), H = in.size(1), L = in.size(2), D = in.size(3);
  const T* ip = in.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), sb = sin.size(0) == 1 ? 0 : sin.stride(0);
  at::parallel_for(0, B * H * L, std::max<int64_t>(1, kGrain / D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * L), h = (r / L) % H, l = r % L;
      rotate_row<V, backward>(ip + b * in.stride(0) + h * in.stride(1) + l * in.stride(2),
                              op + b * out.stride(0) + h * out.stride(1) + l * out.stride(2),
                              cp + b * cb + l * cos.stride(1), sp + b * sb + l * sin.stride(1), D / 2);
    }
  });
}

template <bool backward>
void rotate(const Tensor& in, const Tensor& out, const Tensor& cos, const Tensor& sin) {
  if (in.scalar_type() == at::kFloat)
    rotate_as<FloatValues, backward>(in, out, cos, sin);
  else
    rotate_as<Bf16Values, backward>(in, out, cos, sin);
}

std::tuple<Tensor, Tensor> rotary_fwd(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin) {
  check(q, cos, sin, "q");
  check(k, cos, sin, "k");
  Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);  // the inputs' memory order
  rotate<false>(q, q_out, cos, sin);
  rotate<false>(k, k_out, cos, sin);
  return {q_out, k_out};
}

std::tuple<Tensor, Tensor> rotary_bwd(const Tensor& dq, const Tensor& dk, const Tensor& cos, const Tensor& sin) {
  check(dq, cos, sin, "grad of q");
  check(dk, cos, sin, "grad of k");
  auto projections_order = [](const Tensor& t) {  // (B, L, heads, D) in memory, seen as (B, heads, L, D)
    return at::empty({t.size(0), t.size(2), t.size(1), t.size(3)}, t.options()).transpose(1, 2);
  };
  Tensor grad_q = projections_order(dq), grad_k = projections_order(dk);
  rotate<true>(dq, grad_q, cos, sin);
  rotate<true>(dk, grad_k, cos, sin);
  return {grad_q, grad_k};
}

}  // namespace lorakit_rotary

TORCH_LIBRARY_FRAGMENT(lorakit, m) {
  m.def("rotary_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("rotary_bwd(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("rotary_fwd", lorakit_rotary::rotary_fwd);
  m.impl("rotary_bwd", lorakit_rotary::rotary_bwd);
}

// A LoRA adapter's update of a few rows (a decoded token's batch), fp32, on one thread, in one call:
//
//   lora_rows_(out, x, a, b, scale) -> u     u = x a^T (rows, r);  out += scale * (u b^T), in place
//
// out (..., d_out), x (..., d_in) (rows: the leading dimensions), a (r, d_in), b (d_out, r): contiguous fp32 CPU
// tensors. For a handful of rows the two rank-r products are tiny (8 x 576 x 16 multiply-accumulates, 8 x 16 x
// 1,536), and the matmul library's fixed cost per call (threading, dispatch, a copy of out for addmm) is much of
// their time: mm + addmm take 11-22 us a layer on MKL, 210 layers a decoded token on SmolLM2. Here both run in one
// call, 6-13 us with the call itself: the rows' dot products with a for u, then for each block of output columns
// the matching tile of b transposed in registers and every row's update accumulated from it. The sums run in
// another order than MKL's or oneDNN's: equal to fp32 rounding (docs/performance.md, optimisation 28).
// Built into lorakit_cpu.cpp by lorakit/ops/cpu_extension.py; used by lorakit/methods/lora/fused.py (_forward)
// through lorakit/ops/lora_rows.py.
#include "cpu_capability.h"

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>
#include <algorithm>
#include <vector>

namespace lorakit_lora_rows {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
constexpr int64_t kRowBlock = 8;  // rows updated together: independent accumulators, one per row
constexpr int64_t kDotBlock = 8;  // rank columns of u computed together per row
constexpr int64_t kMaxStackRank = 64;  // ranks whose transposed tile of b (r x kV floats) lives on the stack

void check(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous fp32 CPU tensor");
}

float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, v);
}

// u[i, k0 + q] = sum_d xi[d] a[k0 + q, d] for q < N: N accumulators over d (N a compile-time count, so that they
// stay in registers)
template <int64_t N>
void dot_block(const float* xi, const float* a, float* ui, int64_t k0, int64_t d_in) {
  Vec acc[N];
  for (int64_t q = 0; q < N; ++q) acc[q] = Vec(0.0f);
  const float* ak = a + k0 * d_in;
  int64_t d = 0;
  for (; d + kV <= d_in; d += kV) {
    const Vec xv = Vec::loadu(xi + d);
    for (int64_t q = 0; q < N; ++q) acc[q] = at::vec::fmadd(xv, Vec::loadu(ak + q * d_in + d), acc[q]);
  }
  if (d < d_in) {  // the lanes past d_in load as zero
    const int64_t m = d_in - d;
    const Vec xv = Vec::loadu(xi + d, m);
    for (int64_t q = 0; q < N; ++q) acc[q] = at::vec::fmadd(xv, Vec::loadu(ak + q * d_in + d, m), acc[q]);
  }
  for (int64_t q = 0; q < N; ++q) ui[k0 + q] = hsum(acc[q]);
}

// u = x a^T, row by row, kDotBlock rank columns at a time
void products_with_a(const float* x, const float* a, float* u, int64_t rows, int64_t d_in, int64_t r) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * d_in;
    float* ui = u + i * r;
    int64_t k = 0;
    for (; k + kDotBlock <= r; k += kDotBlock) dot_block<kDotBlock>(xi, a, ui, k, d_in);
    for (; k < r; ++k) dot_block<1>(xi, a, ui, k, d_in);
  }
}

// out[i0 + q, j0 : j0 + m] += scale * sum_k u[i0 + q, k] tile[k], q < N: tile holds b[j0 : j0 + m, :] transposed
template <int64_t N>
void update_rows(const float* u, const float* tile, float* out, int64_t i0, int64_t j0, int64_t m, int64_t r,
                 int64_t d_out, const Vec& scale) {
  Vec acc[N];
  for (int64_t q = 0; q < N; ++q) acc[q] = Vec(0.0f);
  for (int64_t k = 0; k < r; ++k) {
    const Vec t = Vec::loadu(tile + k * kV);
    for (int64_t q = 0; q < N; ++q) acc[q] = at::vec::fmadd(Vec(u[(i0 + q) * r + k]), t, acc[q]);
  }
  for (int64_t q = 0; q < N; ++q) {
    float* o = out + (i0 + q) * d_out + j0;
    (Vec::loadu(o, m) + acc[q] * scale).store(o, m);
  }
}

Tensor lora_rows_(Tensor& out, const Tensor& x, const Tensor& a, const Tensor& b, double scale) {
  check(out, "out");
  check(x, "x");
  check(a, "a");
  check(b, "b");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && x.dim() >= 1 && out.dim() == x.dim(), "lora_rows_: a and b must be ",
              "matrices, x and out of the same number of dimensions");
  const int64_t d_in = x.size(-1), r = a.size(0), d_out = b.size(0), rows = d_in ? x.numel() / d_in : 0;
  TORCH_CHECK(a.size(1) == d_in && b.size(1) == r && out.size(-1) == d_out && out.numel() == rows * d_out,
              "lora_rows_: shapes do not match: out ", out.sizes(), ", x ", x.sizes(), ", a ", a.sizes(), ", b ",
              b.sizes());
  Tensor u = at::empty({rows, r}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  float* up = u.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  products_with_a(xp, ap, up, rows, d_in, r);
  const Vec s(static_cast<float>(scale));
  float tile_on_stack[kMaxStackRank * kV] = {};  // zeros in the lanes a last, narrower block never fills
  std::vector<float> tile_on_heap(r > kMaxStackRank ? r * kV : 0);
  float* tile = r > kMaxStackRank ? tile_on_heap.data() : tile_on_stack;
  for (int64_t j0 = 0; j0 < d_out; j0 += kV) {
    const int64_t m = std::min(kV, d_out - j0);
    // tile[k, c] = b[j0 + c, k]; the columns past m hold earlier values or zeros (their sums are never stored)
    at::vec::transpose_mxn<float>(bp + j0 * r, r, tile, kV, static_cast<int>(m), static_cast<int>(r));
    int64_t i0 = 0;
    for (; i0 + kRowBlock <= rows; i0 += kRowBlock) update_rows<kRowBlock>(up, tile, op, i0, j0, m, r, d_out, s);
    for (; i0 < rows; ++i0) update_rows<1>(up, tile, op, i0, j0, m, r, d_out, s);
  }
  return u;
}

}  // namespace lorakit_lora_rows

TORCH_LIBRARY_FRAGMENT(lorakit, m) {
  m.def("lora_rows_(Tensor(a!) out, Tensor x, Tensor a, Tensor b, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("lora_rows_", lorakit_lora_rows::lora_rows_);
}

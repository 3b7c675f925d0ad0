// A LoRA adapter's update of a few rows (a decoded token's batch), computed in fp32, on one thread, in one call:
//
//   lora_rows_(out, x, a, b, scale) -> u     u = x a^T (rows, r);  out += scale * (u b^T), in place
//   lora_rows_gathered_(out, x, a, bt, scales, slots)   the same per sequence i with its own adapter (a
//                                                mixed-adapter batch): the adapters stacked along a slot axis,
//                                                a (S, r, d_in), bt (S, r, d_out) = B_k^T, scales (S), and the
//                                                slot of each sequence, slots (n) int64
//
// out (..., d_out), x (..., d_in) (rows: the leading dimensions), a (r, d_in), b (d_out, r): contiguous CPU
// tensors, a and b fp32; out and x both fp32, or both bf16 (an fp32 adapter on a bf16 base: the rows are read
// into fp32 scratch, the update added there, and each output rounded to bf16 once, PEFT's arithmetic for that
// case, with no casts around the call). For a handful of rows the two rank-r products are tiny (8 x 576 x 16
// multiply-accumulates, 8 x 16 x 1,536), and the matmul library's fixed cost per call (threading, dispatch, a copy
// of out for addmm) is much of their time: mm + addmm take 11-22 us a layer on MKL, 210 layers a decoded token on
// SmolLM2. Here both run in one call, 6-13 us with the call itself: the rows' dot products with a for u, then for
// each block of output columns the matching tile of b transposed in registers and every row's update accumulated
// from it. The sums run in another order than MKL's or oneDNN's: equal to fp32 rounding (docs/performance.md,
// optimisation 28).
// The gathered form reads each sequence's own adapter from the stacks (0.65 MB a layer of SmolLM2 at r=16), with
// no copy per sequence: sequences that share an adapter read the same weights. Its sequences are split over the
// threads. Built into lorakit_cpu.cpp by lorakit/ops/cpu_extension.py; used by
// lorakit/methods/lora/fused.py (_forward), mixed.py and lorakit/serve/lora_ops.py through lorakit/ops/lora_rows.py.
#include "cpu_capability.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
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

// out and x: contiguous CPU tensors, both fp32 or both bf16
void check_rows(const Tensor& out, const Tensor& x, const char* op) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(out.device().is_cpu() && x.device().is_cpu() && out.is_contiguous() && x.is_contiguous() &&
              out.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16), op,
              ": out and x must be contiguous CPU tensors, both fp32 or both bf16; got ", out.scalar_type(), " and ",
              dtype);
}

// bf16 rows in and out of fp32 scratch
void to_float(const at::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kV <= n; i += kV) {
    Vec v;
    at::vec::load_to_float(src + i, v);
    v.store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
void to_bf16(const float* src, at::BFloat16* dst, int64_t n) { at::vec::convert(src, dst, n); }

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

// the fp32 work of lora_rows_: u = x a^T, then out += scale * u b^T block of output columns by block
void lora_rows_fp32(float* op, const float* xp, const float* ap, const float* bp, float* up, int64_t rows,
                    int64_t d_in, int64_t r, int64_t d_out, float scale) {
  products_with_a(xp, ap, up, rows, d_in, r);
  const Vec s(scale);
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
}

Tensor lora_rows_(Tensor& out, const Tensor& x, const Tensor& a, const Tensor& b, double scale) {
  check_rows(out, x, "lora_rows_");
  check(a, "a");
  check(b, "b");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && x.dim() >= 1 && out.dim() == x.dim(), "lora_rows_: a and b must be ",
              "matrices, x and out of the same number of dimensions");
  const int64_t d_in = x.size(-1), r = a.size(0), d_out = b.size(0), rows = d_in ? x.numel() / d_in : 0;
  TORCH_CHECK(a.size(1) == d_in && b.size(1) == r && out.size(-1) == d_out && out.numel() == rows * d_out,
              "lora_rows_: shapes do not match: out ", out.sizes(), ", x ", x.sizes(), ", a ", a.sizes(), ", b ",
              b.sizes());
  Tensor u = at::empty({rows, r}, a.options());  // fp32: the backward's A x
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* up = u.data_ptr<float>();
  const float s = static_cast<float>(scale);
  if (x.scalar_type() == at::kFloat) {
    lora_rows_fp32(out.data_ptr<float>(), x.data_ptr<float>(), ap, bp, up, rows, d_in, r, d_out, s);
    return u;
  }
  std::vector<float> x32(rows * d_in), out32(rows * d_out);  // the bf16 rows in fp32 (at most a few rows)
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  to_float(x.data_ptr<at::BFloat16>(), x32.data(), rows * d_in);
  to_float(op, out32.data(), rows * d_out);
  lora_rows_fp32(out32.data(), x32.data(), ap, bp, up, rows, d_in, r, d_out, s);
  to_bf16(out32.data(), op, rows * d_out);
  return u;
}

// out_t[j] += scale * sum_k u_t[k] bt[k, j] for the T rows t of one sequence: bt = B^T (r, d_out), contiguous, so
// each output block is a run of FMAs over k; four blocks at a time, each its own accumulator
void add_products_with_bt(const float* u, const float* bt, float* out, int64_t T, int64_t r, int64_t d_out,
                          float scale) {
  const Vec s(scale);
  for (int64_t t = 0; t < T; ++t) {
    const float* ut = u + t * r;
    float* ot = out + t * d_out;
    int64_t j = 0;
    for (; j + 4 * kV <= d_out; j += 4 * kV) {
      Vec acc0(0.0f), acc1(0.0f), acc2(0.0f), acc3(0.0f);
      for (int64_t k = 0; k < r; ++k) {
        const Vec uk(ut[k]);
        const float* bk = bt + k * d_out + j;
        acc0 = at::vec::fmadd(uk, Vec::loadu(bk), acc0);
        acc1 = at::vec::fmadd(uk, Vec::loadu(bk + kV), acc1);
        acc2 = at::vec::fmadd(uk, Vec::loadu(bk + 2 * kV), acc2);
        acc3 = at::vec::fmadd(uk, Vec::loadu(bk + 3 * kV), acc3);
      }
      (Vec::loadu(ot + j) + acc0 * s).store(ot + j);
      (Vec::loadu(ot + j + kV) + acc1 * s).store(ot + j + kV);
      (Vec::loadu(ot + j + 2 * kV) + acc2 * s).store(ot + j + 2 * kV);
      (Vec::loadu(ot + j + 3 * kV) + acc3 * s).store(ot + j + 3 * kV);
    }
    for (; j < d_out; j += kV) {
      const int64_t m = std::min(kV, d_out - j);
      Vec acc(0.0f);
      for (int64_t k = 0; k < r; ++k) acc = at::vec::fmadd(Vec(ut[k]), Vec::loadu(bt + k * d_out + j, m), acc);
      (Vec::loadu(ot + j, m) + acc * s).store(ot + j, m);
    }
  }
}

// A mixed-adapter batch: sequence i (its T rows) uses the adapter in slot slots[i] of the stacks.
//   out (n, T, d_out) += scales[k] * (x_i a_k^T) bt_k, k = slots[i]   x (n, T, d_in), a (S, r, d_in), bt (S, r, d_out)
void lora_rows_gathered_(Tensor& out, const Tensor& x, const Tensor& a, const Tensor& bt, const Tensor& scales,
                         const Tensor& slots) {
  check_rows(out, x, "lora_rows_gathered_");
  check(a, "a");
  check(bt, "bt");
  check(scales, "scales");
  TORCH_CHECK(slots.device().is_cpu() && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "lora_rows_gathered_: slots must be a contiguous int64 CPU tensor");
  TORCH_CHECK(x.dim() == 3 && out.dim() == 3 && a.dim() == 3 && bt.dim() == 3 && scales.dim() == 1 &&
              slots.dim() == 1, "lora_rows_gathered_: out, x, a and bt must have 3 dimensions, scales and slots 1");
  const int64_t n = x.size(0), T = x.size(1), d_in = x.size(2), S = a.size(0), r = a.size(1), d_out = bt.size(2);
  TORCH_CHECK(bt.size(0) == S && scales.size(0) == S && slots.size(0) == n && a.size(2) == d_in && bt.size(1) == r &&
              out.size(0) == n && out.size(1) == T && out.size(2) == d_out,
              "lora_rows_gathered_: shapes do not match: out ", out.sizes(), ", x ", x.sizes(), ", a ", a.sizes(),
              ", bt ", bt.sizes(), ", scales ", scales.sizes(), ", slots ", slots.sizes());
  const int64_t* kp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(kp[i] >= 0 && kp[i] < S, "lora_rows_gathered_: slot ", kp[i], " of sequence ", i,
                " is outside the ", S, " stacked adapters");
  }
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const float* xp = bf16 ? nullptr : x.data_ptr<float>();
  float* op = bf16 ? nullptr : out.data_ptr<float>();
  const at::BFloat16* xb = bf16 ? x.data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* ob = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  const float* ap = a.data_ptr<float>();
  const float* bp = bt.data_ptr<float>();
  const float* sp = scales.data_ptr<float>();
  // the sequences over the threads: each reads its adapter's weights (~0.65 MB a layer of SmolLM2 at r=16), from
  // memory the first time, and one core alone draws less bandwidth than all
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> u(T * r);
    std::vector<float> x32(bf16 ? T * d_in : 0), out32(bf16 ? T * d_out : 0);  // a bf16 sequence in fp32
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = kp[i];
      if (sp[k] == 0.0f) continue;  // no adapter in this layer (the zero slot)
      if (!bf16) {
        products_with_a(xp + i * T * d_in, ap + k * r * d_in, u.data(), T, d_in, r);
        add_products_with_bt(u.data(), bp + k * r * d_out, op + i * T * d_out, T, r, d_out, sp[k]);
        continue;
      }
      to_float(xb + i * T * d_in, x32.data(), T * d_in);
      to_float(ob + i * T * d_out, out32.data(), T * d_out);
      products_with_a(x32.data(), ap + k * r * d_in, u.data(), T, d_in, r);
      add_products_with_bt(u.data(), bp + k * r * d_out, out32.data(), T, r, d_out, sp[k]);
      to_bf16(out32.data(), ob + i * T * d_out, T * d_out);
    }
  });
}

}  // namespace lorakit_lora_rows

TORCH_LIBRARY_FRAGMENT(lorakit, m) {
  m.def("lora_rows_(Tensor(a!) out, Tensor x, Tensor a, Tensor b, float scale) -> Tensor");
  m.def("lora_rows_gathered_(Tensor(a!) out, Tensor x, Tensor a, Tensor bt, Tensor scales, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("lora_rows_", lorakit_lora_rows::lora_rows_);
  m.impl("lora_rows_gathered_", lorakit_lora_rows::lora_rows_gathered_);
}

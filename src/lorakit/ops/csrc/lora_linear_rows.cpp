// A LoRA layer's whole output for a few rows (a decoded token's batch) in one call: the base product of
// linear_rows.cpp and the adapter's update of lora_rows.cpp, which otherwise run as two calls.
//
//   lora_linear_rows(x, weight, bias, a, b, scale) -> (out, u)
//       out = x weight^T + bias + scale * (x a^T) b^T     u = x a^T (rows, r), fp32: what a backward keeps
//
// x (..., d_in) and weight (d_out, d_in) (and bias) contiguous CPU tensors of one dtype, fp32 or bf16, as
// linear_rows takes them; a (r, d_in), b (d_out, r) contiguous fp32. The arithmetic is the two kernels', in their
// order, so the result is theirs bit for bit: the base output rounded to its dtype once (bf16: with the bias, in
// fp32), then the update computed in fp32 from the fp32 factors and added (bf16: the output read into fp32 and
// rounded once more), PEFT's arithmetic for an fp32 adapter on a bf16 base. What the one call saves: the second
// call and its dispatch, and the update of the output columns now runs on every thread, each on the columns whose
// base product it has just computed (in its cache), where lora_rows_ runs on one. u is computed first, on one
// thread (rank-r dot products, a few microseconds). Built into lorakit_cpu.cpp after linear_rows.cpp and
// lora_rows.cpp, whose functions it calls; used through lorakit/ops/lora_rows.py.
#include "cpu_capability.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

namespace lorakit_lora_linear_rows {

using at::Tensor;
namespace base = lorakit_linear_rows;
namespace lora = lorakit_lora_rows;
using Vec = lora::Vec;
constexpr int64_t kV = lora::kV;

// out[:, j0 : j1] += scale * u b[j0 : j1]^T for fp32 rows of stride `stride` whose column j0 is at `out`: lora_rows'
// update on one thread's columns, block by block of kV output columns
void add_update(const float* u, const float* b, float* out, int64_t rows, int64_t j0, int64_t j1, int64_t r,
                int64_t stride, float scale) {
  const Vec s(scale);
  float tile_on_stack[lora::kMaxStackRank * kV] = {};
  std::vector<float> tile_on_heap(r > lora::kMaxStackRank ? r * kV : 0);
  float* tile = r > lora::kMaxStackRank ? tile_on_heap.data() : tile_on_stack;
  for (int64_t j = j0; j < j1; j += kV) {
    const int64_t m = std::min(kV, j1 - j);
    at::vec::transpose_mxn<float>(b + j * r, r, tile, kV, static_cast<int>(m), static_cast<int>(r));
    int64_t i = 0;
    for (; i + lora::kRowBlock <= rows; i += lora::kRowBlock)
      lora::update_rows<lora::kRowBlock>(u, tile, out, i, j - j0, m, r, stride, s);
    for (; i < rows; ++i) lora::update_rows<1>(u, tile, out, i, j - j0, m, r, stride, s);
  }
}

// the base product (linear_rows.cpp's run), each thread then adding the update to its own columns
template <typename S>
void run(const Tensor& x, const Tensor& weight, const Tensor* bias, const float* bp, Tensor& out, const float* up,
         int64_t rows, int64_t d_in, int64_t d_out, int64_t r, float scale) {
  using T = typename S::T;
  T* op = out.data_ptr<T>();
  base::run<S>(x, weight, bias, out, rows, d_in, d_out, [&](int64_t j0, int64_t j1) {
    if constexpr (std::is_same_v<T, float>) {
      add_update(up, bp, op + j0, rows, j0, j1, r, d_out, scale);
    } else {  // this thread's columns of the bf16 output in fp32, updated, rounded once
      const int64_t w = j1 - j0;
      std::vector<float> cols(rows * w);
      for (int64_t i = 0; i < rows; ++i) lora::to_float(op + i * d_out + j0, cols.data() + i * w, w);
      add_update(up, bp, cols.data(), rows, j0, j1, r, w, scale);
      for (int64_t i = 0; i < rows; ++i) lora::to_bf16(cols.data() + i * w, op + i * d_out + j0, w);
    }
  });
}

std::tuple<Tensor, Tensor> lora_linear_rows(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                            const Tensor& a, const Tensor& b, double scale) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && weight.scalar_type() == dtype &&
              (dtype == at::kFloat || (dtype == at::kBFloat16 && base::kBf16Built)) && x.is_contiguous() &&
              weight.is_contiguous() && weight.dim() == 2 && x.dim() >= 1, "lora_linear_rows: x and weight must ",
              "be contiguous CPU tensors of one dtype, fp32", base::kBf16Built ? " or bf16" : "",
              ", weight a matrix; got ", dtype, " ", x.sizes(), " and ", weight.scalar_type(), " ", weight.sizes());
  lora::check(a, "a");
  lora::check(b, "b");
  const int64_t d_in = x.size(-1), d_out = weight.size(0), r = a.size(0), rows = d_in ? x.numel() / d_in : 0;
  TORCH_CHECK(d_in > 0 && weight.size(1) == d_in && a.dim() == 2 && b.dim() == 2 && a.size(1) == d_in &&
              b.size(0) == d_out && b.size(1) == r, "lora_linear_rows: shapes do not match: x ", x.sizes(),
              ", weight ", weight.sizes(), ", a ", a.sizes(), ", b ", b.sizes());
  const Tensor* bp = bias.has_value() && bias->defined() ? &*bias : nullptr;
  if (bp) {
    TORCH_CHECK(bp->device().is_cpu() && bp->scalar_type() == dtype && bp->is_contiguous() && bp->numel() == d_out,
                "lora_linear_rows: bias must be a contiguous CPU tensor of ", d_out, " values in x's dtype");
  }
  Tensor u = at::empty({rows, r}, a.options());
  const float* ap = a.data_ptr<float>();
  float* up = u.data_ptr<float>();
  if (dtype == at::kFloat) {
    lora::products_with_a(x.data_ptr<float>(), ap, up, rows, d_in, r);
  } else {
    std::vector<float> x32(rows * d_in);
    lora::to_float(x.data_ptr<at::BFloat16>(), x32.data(), rows * d_in);
    lora::products_with_a(x32.data(), ap, up, rows, d_in, r);
  }
  auto shape = x.sizes().vec();
  shape.back() = d_out;
  Tensor out = at::empty(shape, x.options());
  const float s = static_cast<float>(scale);
  if (dtype == at::kFloat) {
    run<base::FloatStep>(x, weight, bp, b.data_ptr<float>(), out, up, rows, d_in, d_out, r, s);
  } else {
#if defined(__AVX512BF16__)
    run<base::Bf16Step>(x, weight, bp, b.data_ptr<float>(), out, up, rows, d_in, d_out, r, s);
#endif
  }
  return {out, u};
}

}  // namespace lorakit_lora_linear_rows

TORCH_LIBRARY_FRAGMENT(lorakit, m) {
  m.def("lora_linear_rows(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, float scale) -> (Tensor, "
        "Tensor)");
}

TORCH_LIBRARY_IMPL(lorakit, CPU, m) { m.impl("lora_linear_rows", lorakit_lora_linear_rows::lora_linear_rows); }

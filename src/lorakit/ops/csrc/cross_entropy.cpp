// The softmax cross-entropy of a chunk of bf16 or fp32 logits on the CPU, and its gradient written over the logits: one
// exponential per logit and one pass over each row's memory where PyTorch's operators (ops/cross_entropy.py)
// take two exponentials (log_softmax, then exp of it) and five passes (upcast, log-softmax, exp, scatter, cast).
//
//   cross_entropy_rows(logits, target, write_grad) -> loss (rows,) fp32
//       loss[i] = log(sum_j exp(x_ij - m_i)) + m_i - x_i,target[i]            (m_i = max_j x_ij; x in fp32)
//       with write_grad, logits[i] := T(softmax(x_i) - onehot(target[i]))     (the gradient of loss[i])
//
// Each row is read into an fp32 row buffer once (V floats per thread: 192 KB at 49k, in L2), exp(x - m) is
// computed once into it, and the gradient is written from it. The math is that of log_softmax / exp in fp32; the
// sums run in another order (equal to fp32 rounding). The exponential is ATen's faster exp_u20 for bf16 logits
// and its exp (PyTorch's own, 1 ulp) for fp32 ones, the exact training path. Inputs: logits (rows, V) contiguous
// bf16 or fp32 CPU, target (rows,) int64 in [0, V). Built on first use by lorakit/ops/cpu_extension.py; used by lorakit/ops/cross_entropy.py.
#include "cpu_capability.h"
#include "bf16_rows.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>
#include <cmath>
#include <vector>

namespace lorakit_cross_entropy {

using namespace lorakit_bf16_rows;

template <typename T>
void rows_loss(T* xp, const int64_t* t, float* lp, int64_t rows, int64_t V, bool write_grad) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(V);
    float* e = buf.data();
    for (int64_t i = begin; i < end; ++i) {
      T* x = xp + i * V;
      at::vec::convert(x, e, V);
      const float picked = e[t[i]];
      const float m = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, e, V);
      const Vec vm(m);
      Vec acc(0.f);
      int64_t j = 0;
      for (; j + Vec::size() <= V; j += Vec::size()) {
        Vec v = exp_for(Vec::loadu(e + j) - vm, x);
        v.store(e + j);
        acc = acc + v;
      }
      float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
      for (; j < V; ++j) { e[j] = std::exp(e[j] - m); sum += e[j]; }
      lp[i] = std::log(sum) + m - picked;
      if (write_grad) {
        const float inv = 1.f / sum;
        const float target_grad = e[t[i]] * inv - 1.f;
        at::vec::map([inv](Vec v) { return v * Vec(inv); }, e, e, V);
        e[t[i]] = target_grad;
        at::vec::convert(e, x, V);
      }
    }
  });
}

Tensor cross_entropy_rows(Tensor logits, const Tensor& target, bool write_grad) {
  TORCH_CHECK(logits.device().is_cpu() && (logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat)
              && logits.is_contiguous() && logits.dim() == 2,
              "cross_entropy_rows: logits must be a contiguous (rows, vocabulary) bf16 or fp32 CPU tensor");
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "cross_entropy_rows: empty vocabulary");
  Tensor labels = target.to(at::kLong).contiguous();
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == rows, "cross_entropy_rows: one target per row");
  const int64_t* t = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(t[i] >= 0 && t[i] < V, "cross_entropy_rows: target ", t[i], " is outside the vocabulary (", V, ")");
  Tensor loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  float* lp = loss.data_ptr<float>();
  if (logits.scalar_type() == at::kFloat)
    rows_loss(logits.data_ptr<float>(), t, lp, rows, V, write_grad);
  else
    rows_loss(logits.data_ptr<BFloat16>(), t, lp, rows, V, write_grad);
  return loss;
}

}  // namespace lorakit_cross_entropy

TORCH_LIBRARY_FRAGMENT(lorakit, m) {
  m.def("cross_entropy_rows(Tensor(a!) logits, Tensor target, bool write_grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorakit, CPU, m) {
  m.impl("cross_entropy_rows", lorakit_cross_entropy::cross_entropy_rows);
}

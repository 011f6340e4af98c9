// CPU kernels of dmup::scaled_residual and its backward.
//
// Forward, per row of width n:  u = phi(b);  out = x + s * (u - mean(u))   (mean term only with MS)
// Backward, per row:            dv = s * g;  db = phi'(b) * (dv - mean(dv))
// (MS is its own adjoint, so the backward subtracts the row mean of dv.) Each row is read in one
// pass for the mean and a second pass while it is still in L1; everything is computed in the
// "opmath" type (float for bfloat16/half, else the input type) and rounded once on store.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <type_traits>

#include "../activations.h"
#include "../op_args.h"

namespace dmup {
namespace {

// Elements per parallel task (at::parallel_for's grain): 16K elements, 64 KiB of float32 per input,
// is enough work per task to amortise handing it to another thread; narrow rows are grouped up to it,
// and a row wider than this is a task of its own.
constexpr int64_t kElementsPerTask = 16384;

// Rows per parallel task: kElementsPerTask elements' worth, at least one row.
int64_t rows_per_task(int64_t width) { return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(width, 1)); }

// out[r] = row(Phi, a_row, b_row, out_row) for every row r of the (..., n) tensors a and b, in
// parallel, with phi fixed at compile time; row receives opmath and storage types through its
// arguments (const scalar_t* rows, opmath_t via at::opmath_type).
template <class Row>
at::Tensor map_row_pairs(const at::Tensor& a, const at::Tensor& b, c10::string_view activation, Row&& row) {
  const Activation act = parse_activation(activation);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty_like(ac);
  const int64_t n = ac.size(-1);
  const int64_t rows = n == 0 ? 0 : ac.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ac.scalar_type(), "dmup_scaled_residual_cpu", [&] {
    const scalar_t* ap = ac.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    dispatch_activation(act, [&](auto tag) {
      at::parallel_for(0, rows, rows_per_task(n), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) row(tag, ap + r * n, bp + r * n, op + r * n, n);
      });
    });
  });
  return out;
}

template <class T>
using OpMath = at::opmath_type<std::remove_cv_t<T>>;

at::Tensor scaled_residual_cpu(const at::Tensor& x, const at::Tensor& branch_out, double scale,
                               c10::string_view activation, bool mean_subtract) {
  check_epilogue_inputs(x, "x", branch_out, "branch_out", scale);
  return map_row_pairs(x, branch_out, activation, [&](auto tag, const auto* xr, const auto* br, auto* out, int64_t n) {
    using Phi = Act<decltype(tag)::value>;
    using opmath_t = OpMath<std::remove_pointer_t<decltype(out)>>;
    const opmath_t s = static_cast<opmath_t>(scale);
    opmath_t mean = 0;
    if (mean_subtract) {
      for (int64_t j = 0; j < n; ++j) mean += Phi::value(static_cast<opmath_t>(br[j]));
      mean /= static_cast<opmath_t>(n);
    }
    for (int64_t j = 0; j < n; ++j) {
      const opmath_t u = Phi::value(static_cast<opmath_t>(br[j]));
      out[j] = static_cast<std::remove_pointer_t<decltype(out)>>(static_cast<opmath_t>(xr[j]) + s * (u - mean));
    }
  });
}

at::Tensor scaled_residual_backward_cpu(const at::Tensor& grad_out, const at::Tensor& branch_out, double scale,
                                        c10::string_view activation, bool mean_subtract) {
  check_epilogue_inputs(branch_out, "branch_out", grad_out, "grad_out", scale);
  return map_row_pairs(
      grad_out, branch_out, activation, [&](auto tag, const auto* gr, const auto* br, auto* db, int64_t n) {
        using Phi = Act<decltype(tag)::value>;
        using opmath_t = OpMath<std::remove_pointer_t<decltype(db)>>;
        const opmath_t s = static_cast<opmath_t>(scale);
        opmath_t mean = 0;
        if (mean_subtract) {
          for (int64_t j = 0; j < n; ++j) mean += s * static_cast<opmath_t>(gr[j]);
          mean /= static_cast<opmath_t>(n);
        }
        for (int64_t j = 0; j < n; ++j) {
          const opmath_t du = s * static_cast<opmath_t>(gr[j]) - mean;
          db[j] = static_cast<std::remove_pointer_t<decltype(db)>>(Phi::backward(static_cast<opmath_t>(br[j]), du));
        }
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(dmup, CPU, m) {
  m.impl("scaled_residual", &scaled_residual_cpu);
  m.impl("scaled_residual_backward", &scaled_residual_backward_cpu);
}

}  // namespace dmup

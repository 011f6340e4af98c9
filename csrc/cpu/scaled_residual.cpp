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

#include "../activations.h"
#include "../op_args.h"

namespace dmup {
namespace {

// Rows per parallel task: enough work per task to amortise the thread hand-off.
int64_t rows_per_task(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

void check_pair(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), b_name, " must have the shape of ", a_name, " ", a.sizes(),
                    "; got ", b.sizes());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), b_name, " must have the dtype of ", a_name, " (",
                    a.scalar_type(), "); got ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), b_name, " must be on the device of ", a_name, " (", a.device(),
                    "); got ", b.device());
  TORCH_CHECK_VALUE(a.dim() >= 1, a_name, " must have at least 1 dimension");
}

at::Tensor scaled_residual_cpu(const at::Tensor& x, const at::Tensor& branch_out, double scale,
                               c10::string_view activation, bool mean_subtract) {
  check_pair(x, "x", branch_out, "branch_out");
  const Activation act = parse_activation(activation);
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = branch_out.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "scaled_residual_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const opmath_t s = static_cast<opmath_t>(scale);
    dispatch_activation(act, [&](auto tag) {
      using Phi = Act<decltype(tag)::value>;
      at::parallel_for(0, rows, rows_per_task(n), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* xr = xp + r * n;
          const scalar_t* br = bp + r * n;
          scalar_t* outr = op + r * n;
          opmath_t mean = 0;
          if (mean_subtract) {
            for (int64_t j = 0; j < n; ++j) mean += Phi::value(static_cast<opmath_t>(br[j]));
            mean /= static_cast<opmath_t>(n);
          }
          for (int64_t j = 0; j < n; ++j) {
            const opmath_t u = Phi::value(static_cast<opmath_t>(br[j]));
            outr[j] = static_cast<scalar_t>(static_cast<opmath_t>(xr[j]) + s * (u - mean));
          }
        }
      });
    });
  });
  return out;
}

at::Tensor scaled_residual_backward_cpu(const at::Tensor& grad_out, const at::Tensor& branch_out, double scale,
                                        c10::string_view activation, bool mean_subtract) {
  check_pair(branch_out, "branch_out", grad_out, "grad_out");
  const Activation act = parse_activation(activation);
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor bc = branch_out.contiguous();
  at::Tensor grad_branch = at::empty_like(bc);
  const int64_t n = bc.size(-1);
  const int64_t rows = n == 0 ? 0 : bc.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bc.scalar_type(), "scaled_residual_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    scalar_t* dbp = grad_branch.mutable_data_ptr<scalar_t>();
    const opmath_t s = static_cast<opmath_t>(scale);
    dispatch_activation(act, [&](auto tag) {
      using Phi = Act<decltype(tag)::value>;
      at::parallel_for(0, rows, rows_per_task(n), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* gr = gp + r * n;
          const scalar_t* br = bp + r * n;
          scalar_t* dbr = dbp + r * n;
          opmath_t mean = 0;
          if (mean_subtract) {
            for (int64_t j = 0; j < n; ++j) mean += s * static_cast<opmath_t>(gr[j]);
            mean /= static_cast<opmath_t>(n);
          }
          for (int64_t j = 0; j < n; ++j) {
            const opmath_t du = s * static_cast<opmath_t>(gr[j]) - mean;
            dbr[j] = static_cast<scalar_t>(Phi::backward(static_cast<opmath_t>(br[j]), du));
          }
        }
      });
    });
  });
  return grad_branch;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmup, CPU, m) {
  m.impl("scaled_residual", &scaled_residual_cpu);
  m.impl("scaled_residual_backward", &scaled_residual_backward_cpu);
}

}  // namespace dmup

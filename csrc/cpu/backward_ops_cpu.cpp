// CPU kernels of the fused backward ops (float32, float64, bfloat16; bfloat16 accumulates in
// float32). Both are memory-bound: one read of each operand row and one write, where the
// unfused PyTorch formulation makes six to nine passes over tensors of the size of G.
#include "../ultra_fast.h"
#include "cpu_kernel_macros.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace ultra_fast {
namespace {

// grad[r, :] <- attn[r, :] * (grad[r, :] - <grad[r, :], attn[r, :]>) for `rows` rows of length M.
template <typename T>
inline void softmax_backward_rows_impl(int64_t rows, int64_t M, T* g, const T* a) {
  using acc_t = at::opmath_type<T>;
  for (int64_t r = 0; r < rows; ++r) {
    T* gr = g + r * M;
    const T* ar = a + r * M;
    acc_t dot = 0;
    for (int64_t m = 0; m < M; ++m) dot += static_cast<acc_t>(gr[m]) * static_cast<acc_t>(ar[m]);
    for (int64_t m = 0; m < M; ++m) {
      gr[m] = static_cast<T>(static_cast<acc_t>(ar[m]) * (static_cast<acc_t>(gr[m]) - dot));
    }
  }
}

UF_CLONES void softmax_backward_rows(int64_t rows, int64_t M, float* g, const float* a) {
  softmax_backward_rows_impl<float>(rows, M, g, a);
}
UF_CLONES void softmax_backward_rows(int64_t rows, int64_t M, double* g, const double* a) {
  softmax_backward_rows_impl<double>(rows, M, g, a);
}
UF_CLONES void softmax_backward_rows(int64_t rows, int64_t M, c10::BFloat16* g,
                                     const c10::BFloat16* a) {
  softmax_backward_rows_impl<c10::BFloat16>(rows, M, g, a);
}

// out = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)) + residual, in place over gw, one row of D.
template <typename T>
inline void layer_norm_backward_row_impl(int64_t D, T* g, const T* x, at::opmath_type<T> rstd, const T* res) {
  using acc_t = at::opmath_type<T>;
  acc_t s1 = 0, s2 = 0;
  for (int64_t j = 0; j < D; ++j) {
    const acc_t gj = static_cast<acc_t>(g[j]);
    s1 += gj;
    s2 += gj * static_cast<acc_t>(x[j]);
  }
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(D);
  const acc_t m1 = s1 * inv_d, m2 = s2 * inv_d, rs = rstd;
  if (res != nullptr) {
    for (int64_t j = 0; j < D; ++j) {
      g[j] = static_cast<T>(rs * (static_cast<acc_t>(g[j]) - m1 - static_cast<acc_t>(x[j]) * m2) +
                            static_cast<acc_t>(res[j]));
    }
  } else {
    for (int64_t j = 0; j < D; ++j) {
      g[j] = static_cast<T>(rs * (static_cast<acc_t>(g[j]) - m1 - static_cast<acc_t>(x[j]) * m2));
    }
  }
}

UF_CLONES void layer_norm_backward_row(int64_t D, float* g, const float* x, float rstd,
                                       const float* res) {
  layer_norm_backward_row_impl<float>(D, g, x, rstd, res);
}
UF_CLONES void layer_norm_backward_row(int64_t D, double* g, const double* x, double rstd,
                                       const double* res) {
  layer_norm_backward_row_impl<double>(D, g, x, rstd, res);
}
UF_CLONES void layer_norm_backward_row(int64_t D, c10::BFloat16* g, const c10::BFloat16* x,
                                       float rstd, const c10::BFloat16* res) {
  layer_norm_backward_row_impl<c10::BFloat16>(D, g, x, rstd, res);
}

void check_backward_cpu_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  x.scalar_type() == at::kBFloat16,
              op, ": the CPU kernels support float32, float64 and bfloat16; got ",
              x.scalar_type());
}

void softmax_backward_cpu_(at::Tensor& grad, const at::Tensor& attn) {
  const char* op = "softmax_backward_";
  const SoftmaxDims d = check_softmax_backward(op, grad, attn);
  check_backward_cpu_dtype(op, grad);
  if (grad.numel() == 0) return;
  const at::Tensor a = attn.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "ultra_fast::softmax_backward_ (CPU)", [&] {
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    // One work item = one (group, target): its R rows share the group's R rows of attn.
    at::parallel_for(0, d.P * d.T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t p = w / d.T;
        softmax_backward_rows(d.R, d.M, gp + w * d.R * d.M, ap + p * d.R * d.M);
      }
    });
  });
}

void layer_norm_backward_cpu_(at::Tensor& grad, const at::Tensor& xhat, const at::Tensor& rstd,
                                const c10::optional<at::Tensor>& residual) {
  const char* op = "layer_norm_backward_";
  const LayerNormDims d = check_layer_norm_backward(op, grad, xhat, rstd, residual);
  check_backward_cpu_dtype(op, grad);
  if (grad.numel() == 0) return;
  const at::Tensor x = xhat.contiguous();
  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "ultra_fast::layer_norm_backward_ (CPU)", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // rstd in the accumulation type: float32 statistics pass through unrounded (see the check).
    const at::Tensor rs = rstd.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* rp = rs.const_data_ptr<acc_t>();
    const scalar_t* resp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    const int64_t rows = grad.numel() / d.D;
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t xr = r % d.stat_rows;  // xhat and rstd repeat over the leading dimension
        layer_norm_backward_row(d.D, gp + r * d.D, xp + xr * d.D, rp[xr],
                                resp == nullptr ? nullptr : resp + r * d.D);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ultra_fast, CPU, m) {
  m.impl("softmax_backward_", &softmax_backward_cpu_);
  m.impl("layer_norm_backward_", &layer_norm_backward_cpu_);
}

}  // namespace ultra_fast

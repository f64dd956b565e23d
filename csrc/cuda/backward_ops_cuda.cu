// CUDA kernels of the fused backward ops (float32, float16, bfloat16, float64), accumulating in
// float32 (float64 for float64). One warp per row: the row's reduction is a warp shuffle, then the
// same warp rewrites the row in place; rows are independent, so there is no block-level sync.
#include "../ultra_fast.h"

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

namespace ultra_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// grad row (w = g * T * R + t * R + r) <- attn row (g * R + r) * (grad - <grad, attn>).
template <typename scalar_t, typename acc_t>
__global__ void softmax_backward_kernel(scalar_t* __restrict__ grad, const scalar_t* __restrict__ attn,
                                        int64_t rows, int64_t T, int64_t R, int64_t M) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp; row < rows;
       row += warps) {
    const int64_t r = row % R;
    const int64_t p = row / (T * R);
    scalar_t* g = grad + row * M;
    const scalar_t* a = attn + (p * R + r) * M;
    acc_t dot = 0;
    for (int64_t m = lane; m < M; m += kWarp) dot += static_cast<acc_t>(g[m]) * static_cast<acc_t>(a[m]);
    dot = warp_sum(dot);
    for (int64_t m = lane; m < M; m += kWarp) {
      g[m] = static_cast<scalar_t>(static_cast<acc_t>(a[m]) * (static_cast<acc_t>(g[m]) - dot));
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void layer_norm_backward_kernel(scalar_t* __restrict__ grad, const scalar_t* __restrict__ xhat,
                                           const acc_t* __restrict__ rstd,
                                           const scalar_t* __restrict__ residual, int64_t rows,
                                           int64_t stat_rows, int64_t D) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(D);
  for (int64_t row = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / kWarp; row < rows;
       row += warps) {
    const int64_t xr = row % stat_rows;
    scalar_t* g = grad + row * D;
    const scalar_t* x = xhat + xr * D;
    acc_t s1 = 0, s2 = 0;
    for (int64_t j = lane; j < D; j += kWarp) {
      const acc_t gj = static_cast<acc_t>(g[j]);
      s1 += gj;
      s2 += gj * static_cast<acc_t>(x[j]);
    }
    const acc_t m1 = warp_sum(s1) * inv_d, m2 = warp_sum(s2) * inv_d;
    const acc_t rs = rstd[xr];
    const scalar_t* res = residual == nullptr ? nullptr : residual + row * D;
    for (int64_t j = lane; j < D; j += kWarp) {
      acc_t out = rs * (static_cast<acc_t>(g[j]) - m1 - static_cast<acc_t>(x[j]) * m2);
      if (res != nullptr) out += static_cast<acc_t>(res[j]);
      g[j] = static_cast<scalar_t>(out);
    }
  }
}

void check_backward_cuda(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors; got ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
              ": the CUDA kernels support float32, float16, bfloat16 and float64; got ", st);
}

int64_t warp_grid(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20));  // grid-stride covers the rest
}

void softmax_backward_cuda_(at::Tensor& grad, const at::Tensor& attn) {
  const char* op = "softmax_backward_";
  const SoftmaxDims d = check_softmax_backward(op, grad, attn);
  check_backward_cuda(op, grad);
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor a = attn.contiguous();
  const int64_t rows = d.P * d.T * d.R;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "ultra_fast::softmax_backward_ (CUDA)", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    softmax_backward_kernel<scalar_t, acc_t><<<warp_grid(rows), kWarp * kWarpsPerBlock, 0, stream>>>(
        grad.mutable_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), rows, d.T, d.R, d.M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void layer_norm_backward_cuda_(at::Tensor& grad, const at::Tensor& xhat, const at::Tensor& rstd,
                                      const c10::optional<at::Tensor>& residual) {
  const char* op = "layer_norm_backward_";
  const LayerNormDims d = check_layer_norm_backward(op, grad, xhat, rstd, residual);
  check_backward_cuda(op, grad);
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor x = xhat.contiguous();
  const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  const int64_t rows = grad.numel() / d.D;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "ultra_fast::layer_norm_backward_ (CUDA)", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    // rstd in the accumulation type: float32 statistics pass through unrounded (see the check).
    const at::Tensor rs = rstd.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    layer_norm_backward_kernel<scalar_t, acc_t><<<warp_grid(rows), kWarp * kWarpsPerBlock, 0, stream>>>(
        grad.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), rs.const_data_ptr<acc_t>(),
        res.defined() ? res.const_data_ptr<scalar_t>() : nullptr, rows, d.stat_rows, d.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ultra_fast, CUDA, m) {
  m.impl("softmax_backward_", &softmax_backward_cuda_);
  m.impl("layer_norm_backward_", &layer_norm_backward_cuda_);
}

}  // namespace ultra_fast

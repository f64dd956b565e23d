// CUDA kernels of the ultra_fast ops (float32, float16, bfloat16, float64), accumulating in
// float32 (float64 for float64 inputs). Everything runs on the current stream, with no host
// synchronisation. Like the CPU kernels, G is read in place through its strides; only its
// last dimension must be unit-stride. Only c10/cuda headers are used (not
// ATen/cuda/CUDAContext.h), so the build needs no cuBLAS/cuSPARSE development headers; the
// GEMM of paper_step goes through at::baddbmm.
#include "../ultra_fast.h"

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <sstream>

namespace ultra_fast {

std::string cuda_build_info() {
  std::ostringstream s;
  s << "cuda_version=" << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10;
  return s.str();
}

namespace {

template <typename acc_t>
__device__ __forceinline__ acc_t relu(acc_t g) {
  return g < acc_t(0) ? acc_t(0) : g;
}

// ---------------------------------------------------------------------------------------
// contribution: one thread per output element (b, t, n, m), m fastest (coalesced reads of G
// and A rows); the loop over heads accumulates in acc_t. Output: contiguous (B, T, N, N) of
// out_t (scalar_t for the op itself, acc_t for the paper-step intermediate). index_t is int32
// whenever every element and offset fits (the usual case): the div/mod that split the flat
// index are then 32-bit, several times cheaper than 64-bit ones on the GPU.
template <typename scalar_t, typename acc_t, typename out_t, typename index_t>
__global__ void contribution_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ A,
                                    out_t* __restrict__ out, index_t total, index_t T, index_t H,
                                    index_t N, index_t sGb, index_t sGt, index_t sGh,
                                    index_t sGn, index_t sAb, index_t sAh, index_t sAn) {
  const acc_t inv_h = acc_t(1) / static_cast<acc_t>(H);
  const index_t stride = static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x);
  for (index_t i = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) + threadIdx.x;
       i < total; i += stride) {
    const index_t m = i % N;
    const index_t rest = i / N;
    const index_t n = rest % N;
    const index_t t = (rest / N) % T;
    const index_t b = rest / N / T;
    const scalar_t* g = G + b * sGb + t * sGt + n * sGn + m;
    const scalar_t* a = A + b * sAb + n * sAn + m;
    acc_t acc = 0;
    for (index_t h = 0; h < H; ++h) {
      acc += relu(static_cast<acc_t>(g[h * sGh])) * static_cast<acc_t>(a[h * sAh]);
    }
    out[i] = static_cast<out_t>(acc * inv_h);
  }
}

// ---------------------------------------------------------------------------------------
// rollout_step: out[b, t, m] = v[b, t, m] + (1/H) sum_{h, n} v[b, t, n] relu(G[b,t,h,n,m]) A[b,h,n,m]
// One block per (b, tile of kTileT targets, tile of kTileM columns). Thread (tx, ty): column
// m = tile*kTileM + tx, rows n = ty, ty + kRows, ... of every head h, for each target of the tile:
// A[b, h, n, m] is read once per tile of targets (as the CPU kernel does), not once per target.
// A warp reads kTileM consecutive elements of one row (coalesced); partial sums are reduced over ty
// in shared memory.
constexpr int kTileM = 32;
constexpr int kRows = 8;
constexpr int kTileT = 4;

// v_t: the chain state's dtype (scalar_t, or float32 with a bfloat16/float16 G).
template <typename scalar_t, typename v_t, typename acc_t>
__global__ void __launch_bounds__(kTileM* kRows)
    rollout_kernel(const v_t* __restrict__ v, const scalar_t* __restrict__ G,
                   const scalar_t* __restrict__ A, v_t* __restrict__ out, int64_t T,
                   int64_t H, int64_t N, int64_t m_tiles, int64_t t_tiles, int64_t svb, int64_t svt,
                   int64_t svn, int64_t sGb, int64_t sGt, int64_t sGh, int64_t sGn, int64_t sAb,
                   int64_t sAh, int64_t sAn) {
  __shared__ acc_t partial[kTileT][kRows][kTileM + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  // Block index split once per block (64-bit); the inner loops only add strides.
  const int64_t tile = blockIdx.x % m_tiles;
  const int64_t rest = blockIdx.x / m_tiles;
  const int64_t t0 = (rest % t_tiles) * kTileT;
  const int64_t b = rest / t_tiles;
  const int nt = static_cast<int>(T - t0 < kTileT ? T - t0 : kTileT);
  const int64_t m = tile * kTileM + tx;
  const bool active = m < N;

  const v_t* vb = v + b * svb + t0 * svt;
  const scalar_t* Gb = G + b * sGb + t0 * sGt;
  const scalar_t* Ab = A + b * sAb;

  acc_t acc[kTileT];
#pragma unroll
  for (int j = 0; j < kTileT; ++j) acc[j] = 0;
  if (active) {
    for (int64_t h = 0; h < H; ++h) {
      const scalar_t* Gh = Gb + h * sGh + m;
      const scalar_t* Ah = Ab + h * sAh + m;
      for (int64_t n = ty; n < N; n += kRows) {
        acc_t w[kTileT];
        bool any = false;
#pragma unroll
        for (int j = 0; j < kTileT; ++j) {  // the same for the whole warp
          w[j] = j < nt ? static_cast<acc_t>(vb[j * svt + n * svn]) : acc_t(0);
          any = any || w[j] != acc_t(0);
        }
        if (!any) continue;  // v starts one-hot: skip rows that cannot contribute
        const acc_t a = static_cast<acc_t>(Ah[n * sAn]);
#pragma unroll
        for (int j = 0; j < kTileT; ++j) {
          if (w[j] != acc_t(0)) acc[j] += w[j] * relu(static_cast<acc_t>(Gh[j * sGt + n * sGn])) * a;
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kTileT; ++j) partial[j][ty][tx] = acc[j];
  __syncthreads();
  if (ty == 0 && active) {
    for (int j = 0; j < nt; ++j) {
      acc_t sum = 0;
#pragma unroll
      for (int k = 0; k < kRows; ++k) sum += partial[j][k][tx];
      const acc_t vm = static_cast<acc_t>(vb[j * svt + m * svn]);
      out[((b * T) + t0 + j) * N + m] = static_cast<v_t>(vm + sum / static_cast<acc_t>(H));
    }
  }
}

// ---------------------------------------------------------------------------------------

c10::Device check_cuda_inputs(const char* op, const at::Tensor& G) {
  TORCH_CHECK(G.is_cuda(), op, ": expected CUDA tensors; got G on ", G.device());
  const auto st = G.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              op, ": the CUDA kernels support float32, float16, bfloat16 and float64; got ", st);
  return G.device();
}

// The checked inputs of a (G, A) op: dimensions, a guard on G's device (members are initialised in
// declaration order, so the guard is set before unit_last_stride may copy), unit-stride G and A.
struct CudaGA {
  Dims d;
  c10::cuda::CUDAGuard guard;
  at::Tensor G, A;
  CudaGA(const char* op, const at::Tensor& G_, const at::Tensor& A_)
      : d(check_GA(op, G_, A_)),
        guard(check_cuda_inputs(op, G_)),
        G(unit_last_stride(G_)),
        A(unit_last_stride(A_)) {}
};

bool fits_int32(int64_t x) { return x >= 0 && x <= int64_t(0x7fffffff); }

// Largest element offset reachable through the tensor's strides (+1): bounds 32-bit addressing.
int64_t max_offset(const at::Tensor& t) {
  int64_t off = 1;
  for (int64_t i = 0; i < t.dim(); ++i) off += (t.size(i) - 1) * t.stride(i);
  return off;
}

int64_t grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  // A grid-stride loop covers the rest; cap well below the 2^31-1 limit.
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(1) << 20));
}

// contribution(G, A) into out (contiguous (B, T, N, N), dtype scalar_t or its acc type).
void launch_contribution(const at::Tensor& G, const at::Tensor& A, const Dims& d,
                         at::Tensor& out) {
  const int64_t total = out.numel();
  if (total == 0) return;
  constexpr int threads = 256;
  const int64_t blocks = grid_for(total, threads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, G.scalar_type(), "ultra_fast::contribution (CUDA)", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        const scalar_t* Gp = G.const_data_ptr<scalar_t>();
        const scalar_t* Ap = A.const_data_ptr<scalar_t>();
        auto launch = [&](auto* op, auto index_zero) {
          using out_t = std::remove_pointer_t<decltype(op)>;
          using index_t = decltype(index_zero);
          contribution_kernel<scalar_t, acc_t, out_t, index_t><<<blocks, threads, 0, stream>>>(
              Gp, Ap, op, static_cast<index_t>(total), static_cast<index_t>(d.T),
              static_cast<index_t>(d.H), static_cast<index_t>(d.N), static_cast<index_t>(G.stride(0)),
              static_cast<index_t>(G.stride(1)), static_cast<index_t>(G.stride(2)),
              static_cast<index_t>(G.stride(3)), static_cast<index_t>(A.stride(0)),
              static_cast<index_t>(A.stride(1)), static_cast<index_t>(A.stride(2)));
        };
        // 32-bit indices when every flat index and every element offset of G, A and out fits.
        const bool small = fits_int32(total + int64_t(blocks) * threads) && fits_int32(max_offset(G)) &&
                           fits_int32(max_offset(A));
        if (out.scalar_type() == G.scalar_type()) {
          if (small) launch(out.mutable_data_ptr<scalar_t>(), int32_t(0));
          else launch(out.mutable_data_ptr<scalar_t>(), int64_t(0));
        } else {
          TORCH_INTERNAL_ASSERT(out.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
          if (small) launch(out.mutable_data_ptr<acc_t>(), int32_t(0));
          else launch(out.mutable_data_ptr<acc_t>(), int64_t(0));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

at::Tensor contribution_cuda(const at::Tensor& G_, const at::Tensor& A_) {
  const CudaGA in("contribution", G_, A_);
  at::Tensor out = at::empty({in.d.B, in.d.T, in.d.N, in.d.N}, in.G.options());
  launch_contribution(in.G, in.A, in.d, out);
  return out;
}

at::Tensor rollout_step_cuda(const at::Tensor& v, const at::Tensor& G_, const at::Tensor& A_) {
  const char* op = "rollout_step";
  const CudaGA in(op, G_, A_);
  const Dims& d = in.d;
  check_v(op, v, G_, d);
  const at::Tensor &G = in.G, &A = in.A;
  at::Tensor out = at::empty({d.B, d.T, d.N}, v.options());
  if (out.numel() == 0) return out;
  const int64_t m_tiles = (d.N + kTileM - 1) / kTileM;
  const int64_t t_tiles = (d.T + kTileT - 1) / kTileT;
  const int64_t blocks = d.B * t_tiles * m_tiles;
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), op, ": too many targets for one launch (B*T = ",
              d.B * d.T, "); split the targets into chunks");
  const dim3 threads(kTileM, kRows);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, G.scalar_type(), "ultra_fast::rollout_step (CUDA)", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        auto launch = [&](const auto* vp, auto* op) {
          using v_t = std::remove_const_t<std::remove_pointer_t<decltype(vp)>>;
          rollout_kernel<scalar_t, v_t, acc_t><<<static_cast<unsigned int>(blocks), threads, 0,
                                                 stream>>>(
              vp, G.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), op, d.T, d.H, d.N,
              m_tiles, t_tiles, v.stride(0), v.stride(1), v.stride(2), G.stride(0), G.stride(1),
              G.stride(2), G.stride(3), A.stride(0), A.stride(1), A.stride(2));
        };
        if (v.scalar_type() == G.scalar_type()) {
          launch(v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
        } else {  // float32 state with a reduced-precision G (checked in check_v)
          launch(v.const_data_ptr<float>(), out.mutable_data_ptr<float>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

at::Tensor paper_step_cuda(const at::Tensor& P, const at::Tensor& G_, const at::Tensor& A_) {
  const CudaGA in("paper_step", G_, A_);
  check_P("paper_step", P, G_, in.d);
  const int64_t BT = in.d.B * in.d.T, N = in.d.N;
  // Head-fused contribution in the accumulation type, then one batched GEMM (cuBLAS, current
  // stream) in that type: out = P + C @ P, rounded to the input dtype once at the end.
  const at::ScalarType acc_st = at::toAccumulateType(in.G.scalar_type(), /*is_cuda=*/true);
  at::Tensor C = at::empty({BT, N, N}, in.G.options().dtype(acc_st));
  launch_contribution(in.G, in.A, in.d, C);
  if (C.numel() == 0) return at::empty({in.d.B, in.d.T, N, N}, P.options());
  const at::Tensor P3 = P.reshape({BT, N, N}).to(acc_st);
  return at::baddbmm(P3, C, P3).to(P.scalar_type()).view({in.d.B, in.d.T, N, N});
}

}  // namespace

TORCH_LIBRARY_IMPL(ultra_fast, CUDA, m) {
  m.impl("contribution", &contribution_cuda);
  m.impl("rollout_step", &rollout_step_cuda);
  m.impl("paper_step", &paper_step_cuda);
}

}  // namespace ultra_fast

// CPU kernels of the ultra_fast ops (float32, float64; rollout_step also bfloat16, accumulated
// in float32).
//
// All three ops are memory-bound on G (B*T*H*N*N elements, read exactly once, in place:
// any stride of the B, T, H and row dimensions is accepted, only the last dimension must be
// unit-stride). Work is split with at::parallel_for over tiles of targets of one image
// (compiled with -fopenmp, otherwise single-threaded); each tile reads a row of A once and
// applies it to every target of the tile, so A (shared by all T targets) is streamed from
// L1 instead of L2/L3. Inner loops run over the contiguous last dimension and are
// vectorised; on x86-64 Linux with GCC the hot functions are compiled for AVX-512, AVX2 and
// baseline SSE2 and picked at load time (target_clones), so the binary stays portable.
#include "../ultra_fast.h"
#include "cpu_kernel_macros.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace ultra_fast {
namespace {

// relu that propagates NaN like torch.clamp(min=0); compiles to a single max instruction.
template <typename T>
UF_INLINE T relu(T g) {
  return g < T(0) ? T(0) : g;
}

// Strides (in elements) of the operands; the last dimension of G and A has unit stride.
struct Strides {
  int64_t vb, vt, vn;      // v (B, T, N)
  int64_t Gb, Gt, Gh, Gn;  // G (B, T, H, N, N)
  int64_t Ab, Ah, An;      // A (B, H, N, N)
};

// ---------------------------------------------------------------------------------------
// rollout_step: for nt targets t0..t0+nt-1 of one image,
//   out[t, m] = v[t, m] + (1/H) * sum_{h, n} v[t, n] * relu(G[t, h, n, m]) * A[h, n, m]
// acc: scratch of nt * N elements. out: contiguous rows of length N.
// T: G and A; V: v and out (T, or float32 for a bfloat16 G with a float32 chain state); Acc: sums.
template <typename T, typename V, typename Acc>
UF_INLINE void rollout_tile_impl(int64_t nt, int64_t H, int64_t N, const V* v, const T* G,
                                 const T* A, const Strides& s, Acc* UF_RESTRICT acc,
                                 V* UF_RESTRICT out) {
  std::fill(acc, acc + nt * N, Acc(0));
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t n = 0; n < N; ++n) {
      const T* UF_RESTRICT a = A + h * s.Ah + n * s.An;
      for (int64_t tt = 0; tt < nt; ++tt) {
        const Acc w = static_cast<Acc>(v[tt * s.vt + n * s.vn]);
        if (w == Acc(0)) continue;  // v starts one-hot: skip rows that cannot contribute
        const T* UF_RESTRICT g = G + tt * s.Gt + h * s.Gh + n * s.Gn;
        Acc* UF_RESTRICT o = acc + tt * N;
        UF_SIMD
        for (int64_t m = 0; m < N; ++m) {
          o[m] += w * relu(static_cast<Acc>(g[m])) * static_cast<Acc>(a[m]);
        }
      }
    }
  }
  const Acc Hs = static_cast<Acc>(H);
  for (int64_t tt = 0; tt < nt; ++tt) {
    const V* vt = v + tt * s.vt;
    const Acc* o = acc + tt * N;
    V* r = out + tt * N;
    if (s.vn == 1) {
      UF_SIMD
      for (int64_t m = 0; m < N; ++m) r[m] = static_cast<V>(static_cast<Acc>(vt[m]) + o[m] / Hs);
    } else {
      for (int64_t m = 0; m < N; ++m) {
        r[m] = static_cast<V>(static_cast<Acc>(vt[m * s.vn]) + o[m] / Hs);
      }
    }
  }
}

UF_CLONES void rollout_tile(int64_t nt, int64_t H, int64_t N, const float* v, const float* G,
                            const float* A, const Strides& s, float* acc, float* out) {
  rollout_tile_impl<float, float, float>(nt, H, N, v, G, A, s, acc, out);
}
UF_CLONES void rollout_tile(int64_t nt, int64_t H, int64_t N, const double* v, const double* G,
                            const double* A, const Strides& s, double* acc, double* out) {
  rollout_tile_impl<double, double, double>(nt, H, N, v, G, A, s, acc, out);
}
// bfloat16 inputs, float32 accumulation (the bfloat16 engine mode).
UF_CLONES void rollout_tile(int64_t nt, int64_t H, int64_t N, const c10::BFloat16* v,
                            const c10::BFloat16* G, const c10::BFloat16* A, const Strides& s,
                            float* acc, c10::BFloat16* out) {
  rollout_tile_impl<c10::BFloat16, c10::BFloat16, float>(nt, H, N, v, G, A, s, acc, out);
}
// bfloat16 G and A, float32 chain state v (explain(compute_dtype=bfloat16) keeps the state in float32).
UF_CLONES void rollout_tile(int64_t nt, int64_t H, int64_t N, const float* v,
                            const c10::BFloat16* G, const c10::BFloat16* A, const Strides& s,
                            float* acc, float* out) {
  rollout_tile_impl<c10::BFloat16, float, float>(nt, H, N, v, G, A, s, acc, out);
}

// ---------------------------------------------------------------------------------------
// contribution: rows n0..n1-1 of nt targets of one image,
//   out[t, n, m] = (1/H) * sum_h relu(G[t, h, n, m]) * A[h, n, m]
// out: contiguous (nt, N, N) block starting at target t0 (row stride N, target stride N*N).
template <typename T>
UF_INLINE void contribution_block_impl(int64_t nt, int64_t H, int64_t N, int64_t n0,
                                       int64_t n1, const T* G, const T* A, const Strides& s,
                                       T* UF_RESTRICT out) {
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t n = n0; n < n1; ++n) {
      const T* UF_RESTRICT a = A + h * s.Ah + n * s.An;
      for (int64_t tt = 0; tt < nt; ++tt) {
        const T* UF_RESTRICT g = G + tt * s.Gt + h * s.Gh + n * s.Gn;
        T* UF_RESTRICT o = out + (tt * N + n) * N;
        if (h == 0) {
          UF_SIMD
          for (int64_t m = 0; m < N; ++m) o[m] = relu(g[m]) * a[m];
        } else {
          UF_SIMD
          for (int64_t m = 0; m < N; ++m) o[m] += relu(g[m]) * a[m];
        }
      }
    }
  }
  const T Hs = static_cast<T>(H);
  for (int64_t tt = 0; tt < nt; ++tt) {
    T* UF_RESTRICT o = out + (tt * N + n0) * N;
    const int64_t len = (n1 - n0) * N;
    UF_SIMD
    for (int64_t i = 0; i < len; ++i) o[i] = o[i] / Hs;
  }
}

UF_CLONES void contribution_block(int64_t nt, int64_t H, int64_t N, int64_t n0, int64_t n1,
                                  const float* G, const float* A, const Strides& s,
                                  float* out) {
  contribution_block_impl<float>(nt, H, N, n0, n1, G, A, s, out);
}
UF_CLONES void contribution_block(int64_t nt, int64_t H, int64_t N, int64_t n0, int64_t n1,
                                  const double* G, const double* A, const Strides& s,
                                  double* out) {
  contribution_block_impl<double>(nt, H, N, n0, n1, G, A, s, out);
}

// ---------------------------------------------------------------------------------------

void check_cpu_dtype(const char* op, const at::Tensor& G) {
  TORCH_CHECK(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble, op,
              ": the CPU kernels support float32 and float64; got ", G.scalar_type());
}

Strides make_strides(const at::Tensor* v, const at::Tensor& G, const at::Tensor& A) {
  Strides s{};
  if (v != nullptr) {
    s.vb = v->stride(0);
    s.vt = v->stride(1);
    s.vn = v->stride(2);
  }
  s.Gb = G.stride(0);
  s.Gt = G.stride(1);
  s.Gh = G.stride(2);
  s.Gn = G.stride(3);
  s.Ab = A.stride(0);
  s.Ah = A.stride(1);
  s.An = A.stride(2);
  return s;
}

// Targets per tile: up to 4 (A reuse), fewer when there are too few targets to keep every
// thread busy.
int64_t target_tile(const Dims& d) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (d.B * d.T + threads - 1) / threads;
  return std::max<int64_t>(1, std::min<int64_t>(4, per_thread));
}

// Writes contribution(G, A) into out, a contiguous (B, T, N, N) tensor.
void contribution_into(const at::Tensor& G, const at::Tensor& A, const Dims& d,
                       at::Tensor& out) {
  if (out.numel() == 0) return;
  const Strides s = make_strides(nullptr, G, A);
  const int64_t tile = target_tile(d);
  const int64_t ttiles = (d.T + tile - 1) / tile;
  // Row blocks small enough that a tile's output block (tile * rows * N) stays in L1.
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(d.N, 8192 / (tile * d.N)));
  const int64_t nblocks = (d.N + rows - 1) / rows;
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "ultra_fast::contribution (CPU)", [&] {
    const scalar_t* Gp = G.const_data_ptr<scalar_t>();
    const scalar_t* Ap = A.const_data_ptr<scalar_t>();
    scalar_t* Op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, d.B * ttiles * nblocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t nb = w % nblocks;
        const int64_t tb = (w / nblocks) % ttiles;
        const int64_t b = w / (nblocks * ttiles);
        const int64_t t0 = tb * tile;
        const int64_t nt = std::min(tile, d.T - t0);
        const int64_t n0 = nb * rows, n1 = std::min(d.N, n0 + rows);
        contribution_block(nt, d.H, d.N, n0, n1, Gp + b * s.Gb + t0 * s.Gt, Ap + b * s.Ab, s,
                           Op + (b * d.T + t0) * d.N * d.N);
      }
    });
  });
}

at::Tensor contribution_cpu(const at::Tensor& G_, const at::Tensor& A_) {
  const char* op = "contribution";
  const Dims d = check_GA(op, G_, A_);
  check_cpu_dtype(op, G_);
  const at::Tensor G = unit_last_stride(G_), A = unit_last_stride(A_);
  at::Tensor out = at::empty({d.B, d.T, d.N, d.N}, G.options());
  contribution_into(G, A, d, out);
  return out;
}

at::Tensor rollout_step_cpu(const at::Tensor& v, const at::Tensor& G_, const at::Tensor& A_) {
  const char* op = "rollout_step";
  const Dims d = check_GA(op, G_, A_);
  check_v(op, v, G_, d);
  TORCH_CHECK(G_.scalar_type() == at::kFloat || G_.scalar_type() == at::kDouble ||
                  G_.scalar_type() == at::kBFloat16,
              op, ": the CPU kernel supports float32, float64 and bfloat16; got ",
              G_.scalar_type());
  const at::Tensor G = unit_last_stride(G_), A = unit_last_stride(A_);
  at::Tensor out = at::empty({d.B, d.T, d.N}, v.options());
  if (out.numel() == 0) return out;
  const Strides s = make_strides(&v, G, A);
  const int64_t tile = target_tile(d);
  const int64_t ttiles = (d.T + tile - 1) / tile;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, G.scalar_type(), "ultra_fast::rollout_step (CPU)", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* Gp = G.const_data_ptr<scalar_t>();
    const scalar_t* Ap = A.const_data_ptr<scalar_t>();
    auto run = [&](const auto* vp, auto* Op) {
      at::parallel_for(0, d.B * ttiles, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(static_cast<size_t>(tile * d.N));
        for (int64_t w = begin; w < end; ++w) {
          const int64_t b = w / ttiles;
          const int64_t t0 = (w % ttiles) * tile;
          const int64_t nt = std::min(tile, d.T - t0);
          rollout_tile(nt, d.H, d.N, vp + b * s.vb + t0 * s.vt, Gp + b * s.Gb + t0 * s.Gt,
                       Ap + b * s.Ab, s, acc.data(), Op + (b * d.T + t0) * d.N);
        }
      });
    };
    if (v.scalar_type() == G.scalar_type()) {
      run(v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
    } else {
      run(v.const_data_ptr<acc_t>(), out.mutable_data_ptr<acc_t>());  // float32 state, bfloat16 G
    }
  });
  return out;
}

at::Tensor paper_step_cpu(const at::Tensor& P, const at::Tensor& G_, const at::Tensor& A_) {
  const char* op = "paper_step";
  const Dims d = check_GA(op, G_, A_);
  check_P(op, P, G_, d);
  check_cpu_dtype(op, G_);
  const at::Tensor G = unit_last_stride(G_), A = unit_last_stride(A_);
  // The (N, N) contribution of every target is built head-fused (never a (.., H, N, N)
  // intermediate), then one batched GEMM: out = P + C @ P.
  at::Tensor C = at::empty({d.B, d.T, d.N, d.N}, G.options());
  contribution_into(G, A, d, C);
  if (C.numel() == 0) return at::empty({d.B, d.T, d.N, d.N}, P.options());
  const at::Tensor P3 = P.reshape({d.B * d.T, d.N, d.N});
  return at::baddbmm(P3, C.view({d.B * d.T, d.N, d.N}), P3).view({d.B, d.T, d.N, d.N});
}

}  // namespace

TORCH_LIBRARY_IMPL(ultra_fast, CPU, m) {
  m.impl("contribution", &contribution_cpu);
  m.impl("rollout_step", &rollout_step_cpu);
  m.impl("paper_step", &paper_step_cpu);
}

}  // namespace ultra_fast

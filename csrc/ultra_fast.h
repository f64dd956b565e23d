// Shared declarations and argument checks for the ultra_fast native ops.
//
// Layouts (B images, T targets, H heads, N tokens):
//   A: (B, H, N, N)        attention probabilities of one block
//   G: (B, T, H, N, N)     dF_t/dA of the same block, one per target
//   v: (B, T, N)           rollout-order row vectors
//   P: (B, T, N, N)        paper-order running products
//
// Ops (schemas in ultra_fast.cpp, kernels in cpu/ and cuda/):
//   contribution(G, A)    -> (B, T, N, N)  mean_h(relu(G_h) * A_h)
//   rollout_step(v, G, A) -> (B, T, N)     v + v @ contribution(G, A), fused
//   paper_step(P, G, A)   -> (B, T, N, N)  P + contribution(G, A) @ P
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace ultra_fast {

struct Dims {
  int64_t B, T, H, N;
};

// Checks G (B,T,H,N,N) against A (B,H,N,N); returns the dimensions.
inline Dims check_GA(const char* op, const at::Tensor& G, const at::Tensor& A) {
  TORCH_CHECK(A.dim() == 4 && A.size(2) == A.size(3), op,
              ": A must have shape (B, H, N, N); got ", A.sizes());
  const int64_t B = A.size(0), H = A.size(1), N = A.size(2);
  TORCH_CHECK(G.dim() == 5 && G.size(0) == B && G.size(2) == H && G.size(3) == N &&
                  G.size(4) == N,
              op, ": G must have shape (B, T, H, N, N) matching A (B, H, N, N) = ", A.sizes(),
              "; got ", G.sizes());
  TORCH_CHECK(H > 0, op, ": need at least one head (H >= 1); got A of shape ", A.sizes());
  TORCH_CHECK(G.scalar_type() == A.scalar_type(), op,
              ": G and A must have the same dtype; got G ", G.scalar_type(), " and A ",
              A.scalar_type());
  TORCH_CHECK(G.device() == A.device(), op,
              ": all inputs must be on the same device; got G on ", G.device(), " and A on ",
              A.device());
  return Dims{B, G.size(1), H, N};
}

inline void check_v(const char* op, const at::Tensor& v, const at::Tensor& G, const Dims& d) {
  TORCH_CHECK(v.dim() == 3 && v.size(0) == d.B && v.size(1) == d.T && v.size(2) == d.N, op,
              ": v must have shape (B, T, N) matching G (B, T, H, N, N) = ", G.sizes(),
              "; got v ", v.sizes());
  TORCH_CHECK(v.scalar_type() == G.scalar_type(), op,
              ": v, G and A must have the same dtype; got v ", v.scalar_type(), " and G ",
              G.scalar_type());
  TORCH_CHECK(v.device() == G.device(), op,
              ": all inputs must be on the same device; got v on ", v.device(), " and G on ",
              G.device());
}

inline void check_P(const char* op, const at::Tensor& P, const at::Tensor& G, const Dims& d) {
  TORCH_CHECK(P.dim() == 4 && P.size(0) == d.B && P.size(1) == d.T && P.size(2) == d.N &&
                  P.size(3) == d.N,
              op, ": P must have shape (B, T, N, N) matching G (B, T, H, N, N) = ", G.sizes(),
              "; got P ", P.sizes());
  TORCH_CHECK(P.scalar_type() == G.scalar_type(), op,
              ": P, G and A must have the same dtype; got P ", P.scalar_type(), " and G ",
              G.scalar_type());
  TORCH_CHECK(P.device() == G.device(), op,
              ": all inputs must be on the same device; got P on ", P.device(), " and G on ",
              G.device());
}

// The kernels need a unit stride in the last (m) dimension; any other stride (e.g. G
// passed as a transpose(0, 1) view of a (T, B, H, N, N) tensor) is read in place.
inline at::Tensor unit_last_stride(const at::Tensor& x) {
  if (x.dim() > 0 && x.size(-1) > 1 && x.stride(-1) != 1) return x.contiguous();
  return x;
}

// Build description, "key=value;..." (parsed by ultra_fast.ops.build_info()).
std::string build_info();

}  // namespace ultra_fast

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
//
// Fused pieces of the engine's batched block backward (in place, memory-bound):
//   softmax_backward_(grad (.., T, R, M), attn (.., R, M)): grad <- attn * (grad - rowsum(grad * attn))
//   layer_norm_backward_(grad (.., D), xhat, rstd, residual?): the LayerNorm input cotangent from
//     grad = output cotangent * LN weight; xhat/rstd repeat over grad's extra leading dimensions
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <c10/util/Optional.h>

#include <string>

namespace ultra_fast {

struct Dims {
  int64_t B, T, H, N;
};

// Every input of an op must sit on G's device (the kernels read them all in one launch).
inline void check_device(const char* op, const char* name, const at::Tensor& x, const at::Tensor& G) {
  TORCH_CHECK(x.device() == G.device(), op, ": all inputs must be on the same device; got ", name,
              " on ", x.device(), " and G on ", G.device());
}

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
  check_device(op, "A", A, G);
  return Dims{B, G.size(1), H, N};
}

inline void check_v(const char* op, const at::Tensor& v, const at::Tensor& G, const Dims& d) {
  TORCH_CHECK(v.dim() == 3 && v.size(0) == d.B && v.size(1) == d.T && v.size(2) == d.N, op,
              ": v must have shape (B, T, N) matching G (B, T, H, N, N) = ", G.sizes(),
              "; got v ", v.sizes());
  // A float32 chain state may go with a bfloat16/float16 G (the engine's compute_dtype mode).
  const bool mixed = v.scalar_type() == at::kFloat &&
                     (G.scalar_type() == at::kBFloat16 || G.scalar_type() == at::kHalf);
  TORCH_CHECK(v.scalar_type() == G.scalar_type() || mixed, op,
              ": v must have G's dtype (or float32 with a bfloat16/float16 G); got v ",
              v.scalar_type(), " and G ", G.scalar_type());
  check_device(op, "v", v, G);
}

inline void check_P(const char* op, const at::Tensor& P, const at::Tensor& G, const Dims& d) {
  TORCH_CHECK(P.dim() == 4 && P.size(0) == d.B && P.size(1) == d.T && P.size(2) == d.N &&
                  P.size(3) == d.N,
              op, ": P must have shape (B, T, N, N) matching G (B, T, H, N, N) = ", G.sizes(),
              "; got P ", P.sizes());
  TORCH_CHECK(P.scalar_type() == G.scalar_type(), op,
              ": P, G and A must have the same dtype; got P ", P.scalar_type(), " and G ",
              G.scalar_type());
  check_device(op, "P", P, G);
}

// The kernels need a unit stride in the last (m) dimension; any other stride (e.g. G
// passed as a transpose(0, 1) view of a (T, B, H, N, N) tensor) is read in place.
inline at::Tensor unit_last_stride(const at::Tensor& x) {
  if (x.dim() > 0 && x.size(-1) > 1 && x.stride(-1) != 1) return x.contiguous();
  return x;
}

struct SoftmaxDims {
  int64_t P, T, R, M;  // groups (leading dims of attn), targets, rows, columns
};

inline SoftmaxDims check_softmax_backward(const char* op, const at::Tensor& grad,
                                          const at::Tensor& attn) {
  TORCH_CHECK(attn.dim() >= 2 && grad.dim() == attn.dim() + 1, op,
              ": grad must have shape (..., T, R, M) for attn (..., R, M); got grad ", grad.sizes(),
              " and attn ", attn.sizes());
  const int64_t k = attn.dim() - 2;
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(grad.size(i) == attn.size(i), op, ": grad ", grad.sizes(),
                " does not match attn ", attn.sizes(), " in leading dimension ", i);
  }
  TORCH_CHECK(grad.size(k + 1) == attn.size(k) && grad.size(k + 2) == attn.size(k + 1), op,
              ": grad (..., T, R, M) = ", grad.sizes(), " does not match attn (..., R, M) = ",
              attn.sizes());
  TORCH_CHECK(grad.is_contiguous(), op, ": grad is written in place and must be contiguous");
  TORCH_CHECK(grad.scalar_type() == attn.scalar_type(), op,
              ": grad and attn must have the same dtype; got ", grad.scalar_type(), " and ",
              attn.scalar_type());
  TORCH_CHECK(grad.device() == attn.device(), op,
              ": all inputs must be on the same device; got grad on ", grad.device(),
              " and attn on ", attn.device());
  int64_t P = 1;
  for (int64_t i = 0; i < k; ++i) P *= attn.size(i);
  return SoftmaxDims{P, grad.size(k), attn.size(k), attn.size(k + 1)};
}

struct LayerNormDims {
  int64_t D, stat_rows;  // normalised width; rows of xhat / entries of rstd
};

inline LayerNormDims check_layer_norm_backward(const char* op, const at::Tensor& grad,
                                               const at::Tensor& xhat, const at::Tensor& rstd,
                                               const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(grad.dim() >= 1 && xhat.dim() >= 1 && xhat.dim() <= grad.dim(), op,
              ": xhat must have the trailing shape of grad; got grad ", grad.sizes(), " and xhat ",
              xhat.sizes());
  const int64_t off = grad.dim() - xhat.dim();
  for (int64_t i = 0; i < xhat.dim(); ++i) {
    TORCH_CHECK(xhat.size(i) == grad.size(off + i), op, ": xhat ", xhat.sizes(),
                " must equal the trailing dimensions of grad ", grad.sizes());
  }
  const int64_t D = grad.size(-1);
  TORCH_CHECK(D > 0, op, ": empty normalised dimension");
  const int64_t stat_rows = xhat.numel() / D;
  TORCH_CHECK(rstd.numel() == stat_rows, op, ": rstd must have one value per row of xhat (",
              stat_rows, "); got shape ", rstd.sizes());
  TORCH_CHECK(grad.is_contiguous(), op, ": grad is written in place and must be contiguous");
  TORCH_CHECK(xhat.scalar_type() == grad.scalar_type() && xhat.device() == grad.device(), op,
              ": grad and xhat must share dtype and device; got ", grad.scalar_type(), "/", grad.device(),
              " and ", xhat.scalar_type(), "/", xhat.device());
  // A reduced-precision backward keeps the LayerNorm statistics in float32 (rounding rstd to bf16
  // scales every row by up to 2^-8 off), so rstd may be float32 where grad is bfloat16/float16.
  const bool half = grad.scalar_type() == at::kBFloat16 || grad.scalar_type() == at::kHalf;
  TORCH_CHECK((rstd.scalar_type() == grad.scalar_type() || (half && rstd.scalar_type() == at::kFloat)) &&
                  rstd.device() == grad.device(),
              op, ": rstd must have grad's dtype (or float32 for a bfloat16/float16 grad) and device; got ",
              grad.scalar_type(), "/", grad.device(), " and ", rstd.scalar_type(), "/", rstd.device());
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == grad.sizes() && residual->scalar_type() == grad.scalar_type() &&
                    residual->device() == grad.device(),
                op, ": residual must match grad (", grad.sizes(), ", ", grad.scalar_type(),
                "); got ", residual->sizes(), ", ", residual->scalar_type());
  }
  return LayerNormDims{D, stat_rows};
}

// Build description, "key=value;..." (parsed by ultra_fast.ops.build_info()).
std::string build_info();

}  // namespace ultra_fast

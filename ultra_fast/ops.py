"""Native ULTra ops (``torch.ops.ultra_fast.*``), with typed wrappers.

The kernels live in ``csrc/`` and are compiled into ``ultra_fast._C`` by
``pip install --no-build-isolation -e .``. Importing this module never fails when the
extension is missing: :func:`is_available` then returns ``False`` and calling an op raises
:class:`~ultra_fast.errors.NativeOpsUnavailableError` (a ``RuntimeError``) that says how to build it.
``import ultra_fast`` imports this module, so the ops are registered under ``torch.ops.ultra_fast``
right away (loading the library takes a few tens of milliseconds). The pure-PyTorch oracles are in
:mod:`ultra_fast.engine.reference_ops`.

Layouts (B images, T targets, H heads, N tokens); every op also accepts unbatched inputs (no
leading B dimension: A (H, N, N), G (T, H, N, N), v (T, N), P (T, N, N)):

- ``A``: (B, H, N, N) attention probabilities of one block.
- ``G``: (B, T, H, N, N) gradients dF_t/dA of that block. Any strides of the B, T, H and row
  dimensions are read in place (e.g. ``G`` given as ``x.transpose(0, 1)`` of a
  (T, B, H, N, N) tensor); only a non-unit last-dimension stride costs a copy.
- ``v``: (B, T, N) rollout row vectors; ``P``: (B, T, N, N) paper-order running products.

The fused backward pieces ``softmax_backward_`` and ``layer_norm_backward_`` work in place on
contiguous tensors and also take bfloat16 on CPU.

Dtypes: float32 and float64 on CPU; float32, float16, bfloat16 (and float64) on CUDA, always
accumulated in float32 or wider. All inputs must share one dtype and one device.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .errors import NativeOpsUnavailableError

__all__ = ["contribution", "rollout_step", "paper_step", "softmax_backward_", "layer_norm_backward_",
           "is_available", "build_info"]

_BUILD_HINT = (
    "the ultra_fast native extension (ultra_fast._C) is not built; build it with "
    "`pip install --no-build-isolation -e .` from the repository root"
)

_load_error: Optional[BaseException] = None
try:
    importlib.import_module("ultra_fast._C")
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _load_error = exc

_LOADED = _load_error is None and hasattr(torch.ops.ultra_fast, "rollout_step")


def _require() -> None:
    if not _LOADED:
        detail = f" (import error: {_load_error})" if _load_error is not None else ""
        raise NativeOpsUnavailableError(_BUILD_HINT + detail)


def is_available(device_type: str = "cpu") -> bool:
    """Whether the native ops are built and have kernels for ``device_type`` ("cpu", "cuda")."""
    if not _LOADED:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device_type).type)
    if key is None:
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"ultra_fast::{name}", key)
        for name in ("contribution", "rollout_step", "paper_step", "softmax_backward_", "layer_norm_backward_")
    )


def build_info() -> dict:
    """What was compiled: ``{"built", "cpu", "cuda", "openmp", "torch", ...}``.

    ``torch`` is the running torch version; ``torch_built`` the one the extension was compiled
    against (when built).
    """
    info: dict = {"built": _LOADED, "cpu": False, "cuda": False, "openmp": False,
                  "torch": torch.__version__}
    if not _LOADED:
        if _load_error is not None:
            info["error"] = str(_load_error)
        return info
    for item in torch.ops.ultra_fast._build_info().split(";"):
        key, _, value = item.partition("=")
        info[key] = {"1": True, "0": False}.get(value, value)
    return info


def _batched(x: torch.Tensor, unbatched: bool) -> torch.Tensor:
    return x.unsqueeze(0) if unbatched else x


def contribution(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``mean_h(relu(G_h) * A_h)``: the head-averaged positive gradient-weighted attention.

    Args:
        G: (B, T, H, N, N) gradients, or (T, H, N, N).
        A: (B, H, N, N) attention probabilities, or (H, N, N).

    Returns:
        (B, T, N, N), or (T, N, N) for unbatched inputs. The clamp is per head, before the mean.
    """
    _require()
    unbatched = A.dim() == 3
    out = torch.ops.ultra_fast.contribution(_batched(G, unbatched), _batched(A, unbatched))
    return out.squeeze(0) if unbatched else out


def rollout_step(v: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """One rollout-order chain step, fused: ``v + v @ contribution(G, A)``.

    Computes ``out[b, t, m] = v[b, t, m] + (1/H) sum_{h, n} v[b, t, n] relu(G[b, t, h, n, m])
    A[b, h, n, m]`` reading G once, without materialising the (N, N) contribution.

    Args:
        v: (B, T, N) row vectors, or (T, N); G's dtype, or float32 with a bfloat16/float16 G (the
            engine's ``compute_dtype`` mode keeps its chain state in float32).
        G: (B, T, H, N, N), or (T, H, N, N).
        A: (B, H, N, N), or (H, N, N).

    Returns:
        (B, T, N) in v's dtype, or (T, N) for unbatched inputs.
    """
    _require()
    unbatched = A.dim() == 3
    out = torch.ops.ultra_fast.rollout_step(
        _batched(v, unbatched), _batched(G, unbatched), _batched(A, unbatched))
    return out.squeeze(0) if unbatched else out


def paper_step(P: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """One paper-order chain step: ``P + contribution(G, A) @ P``.

    The (N, N) contribution of each target is built head-fused (no (H, N, N) intermediate),
    then multiplied in one batched GEMM.

    Args:
        P: (B, T, N, N) running products, or (T, N, N).
        G: (B, T, H, N, N), or (T, H, N, N).
        A: (B, H, N, N), or (H, N, N).

    Returns:
        (B, T, N, N), or (T, N, N) for unbatched inputs.
    """
    _require()
    unbatched = A.dim() == 3
    out = torch.ops.ultra_fast.paper_step(
        _batched(P, unbatched), _batched(G, unbatched), _batched(A, unbatched))
    return out.squeeze(0) if unbatched else out


def softmax_backward_(grad: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """In place: ``grad <- attn * (grad - (grad * attn).sum(-1, keepdim=True))``, the softmax backward.

    Args:
        grad: (..., T, R, M) contiguous cotangents of the softmax probabilities, one per target.
        attn: (..., R, M) the probabilities, shared by the T targets.
    Returns:
        ``grad``, now the cotangents of the softmax inputs.
    """
    _require()
    torch.ops.ultra_fast.softmax_backward_(grad, attn)
    return grad


def layer_norm_backward_(grad: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor,
                         residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In place: the LayerNorm input cotangent, ``rstd * (g - mean(g) - xhat * mean(g * xhat)) + residual``.

    Args:
        grad: (..., D) contiguous output cotangents already multiplied by the LayerNorm weight.
        xhat: the normalised inputs, with the trailing shape of ``grad`` (it repeats over grad's
            extra leading dimensions, e.g. targets).
        rstd: one reciprocal standard deviation per row of ``xhat``; ``grad``'s dtype, or float32 for a
            bfloat16/float16 ``grad`` (the reduced-precision backward keeps its statistics in float32).
        residual: optional tensor of ``grad``'s shape added to the result.
    """
    _require()
    torch.ops.ultra_fast.layer_norm_backward_(grad, xhat, rstd, residual)
    return grad


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes only, for torch.compile / FakeTensor tracing. They check what
# the native kernels check, so tracing fails with the same messages.

def _fake_check_GA(op: str, G: torch.Tensor, A: torch.Tensor) -> None:
    torch._check(A.dim() == 4 and A.shape[2] == A.shape[3],
                 lambda: f"{op}: A must have shape (B, H, N, N); got {list(A.shape)}")
    B, H, N = A.shape[0], A.shape[1], A.shape[2]
    torch._check(
        G.dim() == 5 and G.shape[0] == B and G.shape[2] == H and G.shape[3] == N
        and G.shape[4] == N,
        lambda: f"{op}: G must have shape (B, T, H, N, N) matching A (B, H, N, N) = "
                f"{list(A.shape)}; got {list(G.shape)}")
    torch._check(G.dtype == A.dtype,
                 lambda: f"{op}: G and A must have the same dtype; got G {G.dtype} and A {A.dtype}")
    torch._check(G.device == A.device,
                 lambda: f"{op}: all inputs must be on the same device; got G on {G.device} "
                         f"and A on {A.device}")


if _LOADED:
    @torch.library.register_fake("ultra_fast::contribution")
    def _contribution_fake(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        _fake_check_GA("contribution", G, A)
        B, T, _, N, _ = G.shape
        return G.new_empty((B, T, N, N))

    @torch.library.register_fake("ultra_fast::rollout_step")
    def _rollout_step_fake(v: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        _fake_check_GA("rollout_step", G, A)
        B, T, _, N, _ = G.shape
        torch._check(
            v.dim() == 3 and v.shape[0] == B and v.shape[1] == T and v.shape[2] == N,
            lambda: f"rollout_step: v must have shape (B, T, N) matching G (B, T, H, N, N) = "
                    f"{list(G.shape)}; got v {list(v.shape)}")
        mixed = v.dtype == torch.float32 and G.dtype in (torch.bfloat16, torch.float16)
        torch._check((v.dtype == G.dtype or mixed) and v.device == G.device,
                     lambda: "rollout_step: v must have G's dtype (or float32 with a bfloat16/float16 G) "
                             "and its device")
        return v.new_empty((B, T, N))

    @torch.library.register_fake("ultra_fast::paper_step")
    def _paper_step_fake(P: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        _fake_check_GA("paper_step", G, A)
        B, T, _, N, _ = G.shape
        torch._check(
            P.dim() == 4 and P.shape[0] == B and P.shape[1] == T and P.shape[2] == N
            and P.shape[3] == N,
            lambda: f"paper_step: P must have shape (B, T, N, N) matching G (B, T, H, N, N) = "
                    f"{list(G.shape)}; got P {list(P.shape)}")
        torch._check(P.dtype == G.dtype and P.device == G.device,
                     lambda: "paper_step: P, G and A must have the same dtype and device")
        return P.new_empty((B, T, N, N))


    @torch.library.register_fake("ultra_fast::softmax_backward_")
    def _softmax_backward_fake(grad: torch.Tensor, attn: torch.Tensor) -> None:
        torch._check(grad.dim() == attn.dim() + 1 and grad.shape[-2:] == attn.shape[-2:],
                     lambda: f"softmax_backward_: grad must have shape (..., T, R, M) for attn (..., R, M); "
                             f"got grad {list(grad.shape)} and attn {list(attn.shape)}")

    @torch.library.register_fake("ultra_fast::layer_norm_backward_")
    def _layer_norm_backward_fake(grad: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor,
                                  residual: Optional[torch.Tensor]) -> None:
        torch._check(xhat.dim() <= grad.dim() and tuple(grad.shape[grad.dim() - xhat.dim():]) == tuple(xhat.shape),
                     lambda: f"layer_norm_backward_: xhat must have the trailing shape of grad; got grad "
                             f"{list(grad.shape)} and xhat {list(xhat.shape)}")


# ---------------------------------------------------------------------------------------------
# Autograd: backward formulas in plain torch (the forward stays native). relu' follows
# torch.clamp(min=0): the gradient passes where G >= 0. The engine runs the ops under no_grad;
# these make the ops safe to differentiate (and torch.library.opcheck-clean).

def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _dC_to_dG_dA(dC: torch.Tensor, G: torch.Tensor, A: torch.Tensor, needs_G: bool,
                 needs_A: bool):
    """Gradients of C = mean_h(relu(G_h) * A_h) given dL/dC (B, T, N, N)."""
    H = A.shape[1]
    dCh = (dC / H).unsqueeze(2)  # (B, T, 1, N, N)
    dG = dCh * A.unsqueeze(1) * (G >= 0).to(G.dtype) if needs_G else None
    dA = (dCh * G.clamp(min=0)).sum(1) if needs_A else None
    return dG, dA


def _contribution_backward(ctx, grad):
    G, A = ctx.saved_tensors
    return _dC_to_dG_dA(grad, G, A, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


def _rollout_step_backward(ctx, grad):
    v, G, A = ctx.saved_tensors
    dv = dG = dA = None
    if ctx.needs_input_grad[0]:
        C = torch.ops.ultra_fast.contribution(G, A)
        dv = grad + (C @ grad.unsqueeze(-1)).squeeze(-1)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dC = v.unsqueeze(-1) * grad.unsqueeze(-2)  # outer product (B, T, N, N)
        dG, dA = _dC_to_dG_dA(dC, G, A, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    return dv, dG, dA


def _paper_step_backward(ctx, grad):
    P, G, A = ctx.saved_tensors
    dP = dG = dA = None
    if ctx.needs_input_grad[0]:
        C = torch.ops.ultra_fast.contribution(G, A)
        dP = grad + C.transpose(-1, -2) @ grad
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dC = grad @ P.transpose(-1, -2)
        dG, dA = _dC_to_dG_dA(dC, G, A, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    return dP, dG, dA


if _LOADED:
    torch.library.register_autograd("ultra_fast::contribution", _contribution_backward,
                                    setup_context=_setup_context)
    torch.library.register_autograd("ultra_fast::rollout_step", _rollout_step_backward,
                                    setup_context=_setup_context)
    torch.library.register_autograd("ultra_fast::paper_step", _paper_step_backward,
                                    setup_context=_setup_context)

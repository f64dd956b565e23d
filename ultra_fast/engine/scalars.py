"""The scalar f whose gradient defines a token's explanation (docs/method.md §2 step 1).

Every scalar is applied to the whole (B, N, d) token tensor at the explained layer and returns
(B, N): one value per token, each depending on its own token only. Position-dependent scalars
(ULTra_W) therefore see which row is which.
"""
from __future__ import annotations

import os
from typing import Callable, Union

import torch
from torch import nn

from ..errors import ConfigError, InputError
from .w_checkpoint import load_w

ScalarFn = Callable[[torch.Tensor], torch.Tensor]
SCALARS = ("sum", "energy", "norm", "learned")


def scalar_sum(z: torch.Tensor) -> torch.Tensor:
    """ULTra_S: the sum of the token's coordinates."""
    return z.sum(-1)


def scalar_energy(z: torch.Tensor) -> torch.Tensor:
    """ULTra_E: the squared norm <z, z>."""
    return (z * z).sum(-1)


def scalar_norm(z: torch.Tensor) -> torch.Tensor:
    """The authors' notebook: the Euclidean norm."""
    return torch.linalg.vector_norm(z, dim=-1)


class LearnedScalar(nn.Module):
    """ULTra_W: f(z_i) = <z_i, w_i> with one unit vector w_i = theta_i / ||theta_i|| per token position.

    ``theta`` is (N, d) for every token, or (n, d) for the patch tokens only (prefix tokens then
    have no scalar and are refused as targets by the engine).
    """

    def __init__(self, theta: torch.Tensor, num_prefix_tokens: int = 0):
        super().__init__()
        if theta.dim() != 2:
            raise InputError(f"learned scalar weights must be (tokens, d); got shape {tuple(theta.shape)}")
        self.theta = nn.Parameter(theta.detach().clone(), requires_grad=theta.requires_grad)
        self.num_prefix_tokens = num_prefix_tokens

    @property
    def directions(self) -> torch.Tensor:
        return self.theta / torch.linalg.vector_norm(self.theta, dim=-1, keepdim=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        N, d = z.shape[-2:]
        w = self.directions.to(device=z.device, dtype=z.dtype)
        if w.shape[-1] != d:
            raise InputError(f"learned scalar weights have dimension {w.shape[-1]}, tokens have {d}")
        if w.shape[0] == N:
            return (z * w).sum(-1)
        if w.shape[0] == N - self.num_prefix_tokens:
            # Prefix tokens have no learned direction; their scalar is undefined, and left as zero so that
            # asking to explain them fails loudly in the engine rather than silently using another f.
            out = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
            out[..., self.num_prefix_tokens:] = (z[..., self.num_prefix_tokens:, :] * w).sum(-1)
            return out
        raise InputError(f"learned scalar weights cover {w.shape[0]} token positions; the model has "
                         f"{N} tokens ({self.num_prefix_tokens} prefix). Was W trained for another grid?")


def load_learned_weights(weights, adapter=None, inputs=None) -> torch.Tensor:
    """Θ from ``weights``: a tensor is used as is (unchecked); a path is read as a W checkpoint and, when
    ``adapter`` is given, refused unless it was trained for this model (``adapter.name``) and for the
    patch grid ``adapter.grid_size(inputs)``, with an error naming both values."""
    if isinstance(weights, torch.Tensor):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        # a patch grid only for image adapters; token (text) adapters have none to check against
        has_grid = hasattr(adapter, "grid_size") and inputs is not None
        grid = adapter.grid_size(inputs) if has_grid else None
        return load_w(weights, model_name=adapter.name if adapter is not None else None, grid=grid,
                      num_prefix_tokens=adapter.num_prefix_tokens if adapter is not None else None,
                      dim=adapter.embed_dim if adapter is not None else None).theta
    raise TypeError(f"weights must be a (tokens, d) tensor or a W checkpoint path; got {type(weights).__name__}")


def resolve_scalar(scalar: Union[str, ScalarFn], weights: Union[None, torch.Tensor, str, os.PathLike] = None,
                   num_prefix_tokens: int = 0, adapter=None, inputs=None) -> ScalarFn:
    """A callable (B, N, d) -> (B, N) for a scalar name or a user callable.

    ``adapter`` and ``inputs`` (optional) let a W checkpoint path be checked against the model and the
    patch grid it is used with (see ``load_learned_weights``).
    """
    if callable(scalar):
        return scalar
    if scalar == "sum":
        return scalar_sum
    if scalar == "energy":
        return scalar_energy
    if scalar == "norm":
        return scalar_norm
    if scalar == "learned":
        if weights is None:
            raise ConfigError('scalar="learned" needs weights= (a (tokens, d) tensor or a W checkpoint path)')
        return LearnedScalar(load_learned_weights(weights, adapter, inputs), num_prefix_tokens)
    raise ConfigError(f"unknown scalar {scalar!r}; expected one of {SCALARS} or a callable")


def token_cotangents(fn: ScalarFn, z: torch.Tensor) -> torch.Tensor:
    """dF_r/dz_r for every token r at once: (B, N, d). Valid because f acts on each token separately."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        F = fn(z)
        if F.shape != z.shape[:-1]:
            raise ConfigError(f"the scalar function must map (..., d) tokens to (...) values; "
                              f"got {tuple(F.shape)} from {tuple(z.shape)}")
        (grad,) = torch.autograd.grad(F.sum(), z, allow_unused=True)
    return torch.zeros_like(z) if grad is None else grad

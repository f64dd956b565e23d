"""The protocol the engine talks to: a transformer as embed -> blocks, attention probabilities exposed.

Two layers of it: ``TokenAdapter``, the modality-free core (token ids, images, anything ``embed``
takes: ``embed``, ``block``, the sizes, and ``run``, the one forward loop every caller uses), and
``Adapter``, an image adapter on top of it (preprocessing, the patch grid, input checks). Text
adapters are ``TokenAdapter``s and have no image methods at all.

An adapter never patches or hooks the wrapped model. It calls the model's own sub-modules in the
model's own order and computes each block's attention explicitly from the module's parameters,
so that the softmax probabilities ``A^(b)`` are ordinary tensors in the autograd graph. The user's
model is therefore never modified; adapters are verified against the unmodified model's outputs.
"""
from __future__ import annotations

import abc
from typing import Any, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError, InputError, UnsupportedModelError  # noqa: F401 - the adapters import it from here
from .preprocess import Preprocessing, preprocess


class Forward(NamedTuple):
    """What ``TokenAdapter.run`` returns.

    ``tokens``: z^(upto) (B, N, d), the residual stream after block ``upto`` (z^(0) when upto = 0);
    ``inputs``: the inputs z^(s-1), ..., z^(upto-1) of blocks s..upto (s = ``keep_inputs_from``), else [];
    ``attentions``: A^(1), ..., A^(upto) (B, H, N, N) when ``keep_attn``, else [].
    """

    tokens: torch.Tensor
    inputs: List[torch.Tensor]
    attentions: List[torch.Tensor]


class TokenAdapter(nn.Module, abc.ABC):
    """A transformer seen as ``z0 = embed(x)``, ``z_b = block(b, z_{b-1})``, whatever its inputs are.

    Attributes the engine relies on: ``num_blocks`` (L), ``num_heads`` (H), ``num_prefix_tokens``
    (P: CLS and registers, first in the sequence; 0 for text), ``embed_dim`` (d).
    """

    num_blocks: int
    num_heads: int
    num_prefix_tokens: int
    embed_dim: int
    name: str = "model"

    @abc.abstractmethod
    def embed(self, inputs: Any) -> torch.Tensor:
        """The model's inputs (preprocessed images, token ids) -> z^(0) of shape (B, N, d)."""

    @abc.abstractmethod
    def block(self, index: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run block ``index`` (0-based) on (B, N, d); return (output, attention probabilities (B, H, N, N))."""

    @abc.abstractmethod
    def head(self, z: torch.Tensor) -> torch.Tensor:
        """What the unmodified model returns from the last block's tokens (used to verify the adapter)."""

    def block_spec(self, index: int):
        """The block as a ``PreNormBlock`` for the hand-written batched backward, or None (use autograd)."""
        return None

    def run(self, inputs: Any, upto: Optional[int] = None, keep_inputs_from: Optional[int] = None,
            keep_attn: bool = False) -> Forward:
        """The forward loop: ``embed``, then blocks 1..``upto`` (default: all L), in the caller's grad mode.

        ``keep_inputs_from``: 1-based block s; keep the inputs of blocks s..upto (what the batched
        backward recomputes each block from). ``keep_attn``: keep every block's attention probabilities
        (in the graph when grad is enabled). Every forward of the package goes through here, so the
        engine, the references and the evaluations all see the very same tokens.
        """
        upto = self.num_blocks if upto is None else upto
        if not isinstance(upto, int) or not 0 <= upto <= self.num_blocks:
            raise ConfigError(f"upto={upto!r} must be an int in 0..{self.num_blocks} (blocks of {self.name})")
        if keep_inputs_from is not None and not (isinstance(keep_inputs_from, int) and 1 <= keep_inputs_from):
            raise ConfigError(f"keep_inputs_from={keep_inputs_from!r} must be a 1-based block index")
        first_kept = upto if keep_inputs_from is None else keep_inputs_from - 1
        kept: List[torch.Tensor] = []
        attentions: List[torch.Tensor] = []
        z = self.embed(inputs)
        for b in range(upto):
            if b >= first_kept:
                kept.append(z)
            z, attn = self.block(b, z)
            if keep_attn:
                attentions.append(attn)
        return Forward(z, kept, attentions)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.head(self.run(inputs).tokens)


class Adapter(TokenAdapter):
    """An image transformer: a ``TokenAdapter`` whose inputs are preprocessed (B, 3, H, W) images cut into a
    patch grid, with the model's preprocessing and a check of the images it can take."""

    @abc.abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> z^(0) of shape (B, N, d)."""

    @abc.abstractmethod
    def grid_size(self, images: torch.Tensor) -> Tuple[int, int]:
        """The patch grid (h, w) the images produce."""

    @property
    def preprocessing(self) -> Preprocessing:
        """How PIL images become this model's input tensors (the built-in adapters all define it)."""
        raise NotImplementedError(f"{self.name} defines no preprocessing; pass preprocessed tensors")

    def preprocess(self, images, size=None) -> torch.Tensor:
        """PIL image(s) -> the normalised (B, 3, h, w) tensor this model expects (see ``models.preprocess``)."""
        return preprocess(images, self.preprocessing, size=size).to(device=self.device, dtype=self.dtype)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a clear error for inputs the model cannot take."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W); got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"images must have shape (B, 3, H, W); got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating tensor (preprocessed); got dtype {images.dtype}")
        ph, pw = self.preprocessing.patch_size
        if images.shape[-2] < ph or images.shape[-1] < pw:
            raise InputError(
                f"images of size {tuple(images.shape[-2:])} are smaller than one {ph}x{pw} patch of {self.name}")


def layer_scale(module: nn.Module) -> Tuple[bool, Optional[torch.Tensor]]:
    """(understood, gamma) for a LayerScale-or-Identity module."""
    if isinstance(module, nn.Identity):
        return True, None
    gamma = getattr(module, "gamma", None)
    return isinstance(gamma, torch.Tensor), gamma


def explicit_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    num_heads: int,
    scale: float,
    q_norm: Optional[nn.Module] = None,
    k_norm: Optional[nn.Module] = None,
    attn_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multi-head self-attention with the probabilities returned.

    Returns (per-head outputs merged to (B, N, H*dh) before the output projection, A (B, H, N, N)).
    """
    B, N, _ = x.shape
    qkv = nn.functional.linear(x, qkv_weight, qkv_bias)
    q, k, v = qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if q_norm is not None:
        assert k_norm is not None, "q_norm and k_norm are given together"
        q, k = q_norm(q), k_norm(k)
    scores = (q * scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask
    attn = scores.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, -1)
    return out, attn

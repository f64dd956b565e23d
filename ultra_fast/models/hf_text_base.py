"""What every Hugging Face text adapter shares: the config read, token-id inputs, P = 0, the identity head."""
from __future__ import annotations

from collections.abc import Mapping
from typing import List, Optional

import torch
from torch import nn

from ..errors import InputError
from .base import TokenAdapter, UnsupportedModelError


def base_model(model: nn.Module) -> nn.Module:
    """The transformer under a task head (``model.base_model``), or the model itself."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def require_parts(base: nn.Module, parts, shape: str) -> None:
    """Refuse a model whose base lacks one of ``parts`` (names the first missing one and the expected shape)."""
    for part in parts:
        if not hasattr(base, part):
            raise UnsupportedModelError(f"{type(base).__name__} lacks '{part}': not a {shape} model")


def require_block_parts(blocks, parts, attention: str, attention_parts, what: str) -> None:
    """Refuse a model one of whose ``blocks`` lacks one of ``parts`` or one of its ``attention`` module's
    ``attention_parts``; the message names the block and every missing part (e.g. ``self_attn.q_proj``)."""
    for i, block in enumerate(blocks):
        attn = getattr(block, attention, None)
        missing = [p for p in parts if not hasattr(block, p)]
        missing += [f"{attention}.{p}" for p in attention_parts if not hasattr(attn, p)]
        if missing:
            raise UnsupportedModelError(f"{what} {i} ({type(block).__name__}) lacks {', '.join(missing)}")


class HFTextAdapter(TokenAdapter):
    """Common part of the text adapters: token ids in, P = 0. A ``TokenAdapter``: text has no images,
    so no patch grid and no preprocessing."""

    causal: bool = True
    max_positions: Optional[int] = None

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no transformers config")
        impl = getattr(cfg, "_attn_implementation", None)
        self.model = model
        self.base = base_model(model)
        self.config = cfg
        self.num_prefix_tokens = 0
        self.embed_dim = int(cfg.hidden_size)
        self.num_heads = int(cfg.num_attention_heads)
        self.name = getattr(cfg, "_name_or_path", None) or type(model).__name__
        self.attn_implementation = impl  # informative only: attention is always computed explicitly here
        mp = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.max_positions = int(mp) if mp else None

    def input_ids(self, inputs) -> torch.Tensor:
        """(B, N) long token ids from a tensor, a list, or a tokenizer's output (no padding allowed)."""
        if isinstance(inputs, Mapping):
            mask = inputs.get("attention_mask")
            if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
                raise InputError("padded inputs are not supported: explain one text at a time "
                                 "(or texts of equal length without padding)")
            inputs = inputs["input_ids"]
        ids = torch.as_tensor(inputs)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise InputError(f"expected integer token ids of shape (B, N); got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] == 0:
            raise InputError("empty token sequence")
        if self.max_positions is not None and ids.shape[1] > self.max_positions:
            raise InputError(f"{ids.shape[1]} tokens exceed the {self.max_positions} positions of {self.name}")
        return ids.to(self.device)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """The unmodified model's ``last_hidden_state`` from the last block's tokens."""
        return z

    def hidden_states(self, inputs) -> List[torch.Tensor]:
        """[z^(0), z^(1), ..., z^(L)]: the residual stream before and after every block (no final norm)."""
        fw = self.run(inputs, keep_inputs_from=1)
        return fw.inputs + [fw.tokens]


__all__ = ["HFTextAdapter", "base_model"]

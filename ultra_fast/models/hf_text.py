"""Adapters for Hugging Face ``transformers`` language models: Llama-family and GPT-2 decoders, BERT encoders.

Like the image adapters, these never patch or hook the user's model. Each block is run from the
model's own sub-modules (norms, projections, MLP, rotary embedding) in the model's own order, with
the attention computed explicitly ("eager") so that the softmax probabilities ``A^(b)`` (B, H, N, N)
are ordinary tensors in the autograd graph:

- decoders (``llama``, ``mistral``, ``qwen2``, ``qwen3``; ``gpt2``; ``hf_text_decoders``): causal mask;
  RoPE from the model's own ``rotary_emb``; grouped KV heads are repeated to the H query heads, so ``A``
  has one map per query head (SmolLM2-135M: 9 heads, 3 KV heads).
- encoders (``bert`` and BERT-shaped ``roberta``/``xlm-roberta``/``electra``; ``hf_text_bert``): no mask;
  post-norm blocks through the model's own ``attention.output`` and ``output`` modules.

The adapters are ``TokenAdapter``s (the modality-free core of the protocol): token ids in, no patch
grid, no image preprocessing. Text has no prefix tokens: P = 0 (a BERT [CLS] is an ordinary token
here). ``layer=l`` is the residual stream after block l, before any final norm; ``head(z)`` applies the
model's final norm (if any), so ``adapter(ids)`` equals the unmodified model's ``last_hidden_state``.
Precision: see ``hf_text_attention``. Padding is not supported: explain one text per call, or texts
of equal length without padding. Loading models offline: ``hf_text_loading``.

This module picks the adapter for a model (``wrap_text``) and re-exports the public names.
"""
from __future__ import annotations

from torch import nn

from .base import TokenAdapter, UnsupportedModelError
from .hf_text_attention import attention_probs, causal_mask
from .hf_text_base import HFTextAdapter
from .hf_text_bert import BertTextAdapter
from .hf_text_decoders import GPT2TextAdapter, LlamaTextAdapter
from .hf_text_loading import load_smollm2, load_text_model, smollm2_path

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
GPT2_LIKE = ("gpt2",)
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra")
SUPPORTED_TYPES = LLAMA_LIKE + GPT2_LIKE + BERT_LIKE


def is_hf_text(model: nn.Module) -> bool:
    """True for a ``transformers`` model whose ``config.model_type`` one of these adapters knows."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) in SUPPORTED_TYPES and hasattr(model, "base_model")


def wrap_text(model: nn.Module) -> TokenAdapter:
    """The text adapter for a ``transformers`` model (returned as is when already an adapter)."""
    if isinstance(model, TokenAdapter):
        return model
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype in LLAMA_LIKE:
        return LlamaTextAdapter(model)
    if mtype in GPT2_LIKE:
        return GPT2TextAdapter(model)
    if mtype in BERT_LIKE:
        return BertTextAdapter(model)
    raise UnsupportedModelError(
        f"no ultra_fast text adapter for {type(model).__name__} (model_type={mtype!r}); supported model types: "
        f"{', '.join(SUPPORTED_TYPES)}")


__all__ = ["SUPPORTED_TYPES", "HFTextAdapter", "LlamaTextAdapter", "GPT2TextAdapter", "BertTextAdapter",
           "attention_probs", "causal_mask", "is_hf_text", "wrap_text", "smollm2_path", "load_smollm2",
           "load_text_model"]

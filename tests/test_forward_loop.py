"""The one forward loop (``TokenAdapter.run``) and the split of the adapter protocol (issue 14).

``run`` must return exactly what the hand-written embed-then-blocks loop gives (the engine, the
references and the evaluations all use it, and the engine's exactness tests compare against them), keep
the right block inputs / attention maps, refuse bad block counts, and be the only such loop in the package.
"""
import re
from pathlib import Path

import pytest
import torch

from ultra_fast import wrap
from ultra_fast.errors import ConfigError, UnsupportedModelError
from ultra_fast.models import Adapter, Forward, TokenAdapter

import models_zoo as zoo

PACKAGE = Path(__file__).resolve().parents[1] / "ultra_fast"


def _by_hand(adapter, x, upto):
    """The loop every caller used to write: z^(0), then blocks 1..upto, keeping inputs and attentions."""
    zs, attns = [adapter.embed(x)], []
    for b in range(upto):
        z, a = adapter.block(b, zs[-1])
        zs.append(z)
        attns.append(a)
    return zs, attns


@pytest.mark.parametrize("key", ["dino_s16", "dinov2_s14_reg"])
def test_run_equals_the_loop_by_hand(key):
    model, size = zoo.get(key)
    adapter = wrap(model)
    x = zoo.images(size, batch=2)
    L = adapter.num_blocks
    with torch.no_grad():
        zs, attns = _by_hand(adapter, x, L)
        for upto, s in [(L, 1), (L, 3), (5, 5), (4, None), (0, None)]:
            fw = adapter.run(x, upto=upto, keep_inputs_from=s, keep_attn=True)
            assert isinstance(fw, Forward)
            assert torch.equal(fw.tokens, zs[upto])  # bit-identical: the same ops in the same order
            kept = [] if s is None else zs[s - 1:upto]
            assert len(fw.inputs) == len(kept) and all(torch.equal(a, b) for a, b in zip(fw.inputs, kept))
            assert len(fw.attentions) == upto
            assert all(torch.equal(a, b) for a, b in zip(fw.attentions, attns))
        default = adapter.run(x)
        assert torch.equal(default.tokens, zs[L]) and default.inputs == [] and default.attentions == []
        assert torch.equal(adapter(x), adapter.head(zs[L]))


def test_run_keeps_the_graph_in_the_callers_grad_mode():
    model, size = zoo.get("dino_s16")
    adapter = wrap(model)
    x = zoo.images(size, batch=1)
    with torch.enable_grad():
        fw = adapter.run(x, upto=2, keep_attn=True)
    assert all(a.grad_fn is not None for a in fw.attentions)
    (g,) = torch.autograd.grad(fw.tokens.sum(), fw.attentions[0])
    assert g.shape == fw.attentions[0].shape and float(g.abs().max()) > 0
    with torch.no_grad():
        assert adapter.run(x, upto=2, keep_attn=True).attentions[0].grad_fn is None


def test_run_refuses_bad_block_counts():
    adapter = wrap(zoo.get("dino_s16")[0])
    x = zoo.images(zoo.get("dino_s16")[1], batch=1)
    L = adapter.num_blocks
    for upto in (L + 1, -1, 2.0):
        with pytest.raises(ConfigError, match="upto"):
            adapter.run(x, upto=upto)
    with pytest.raises(ConfigError, match="keep_inputs_from"):
        adapter.run(x, upto=3, keep_inputs_from=0)
    assert adapter.run(x, upto=3, keep_inputs_from=5).inputs == []  # nothing from past ``upto``


def test_one_forward_loop_in_the_package():
    """Only ``TokenAdapter.run`` embeds and loops over blocks; the engine's per-block VJP (one block,
    recomputed from its saved input) is the only other caller of ``.block(``."""
    embeds, blocks = set(), set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(PACKAGE).as_posix()
        if re.search(r"\.embed\(", text):
            embeds.add(rel)
        if re.search(r"\.block\(", text):
            blocks.add(rel)
    assert embeds == {"models/base.py"}, embeds
    assert blocks == {"models/base.py", "engine/explain.py"}, blocks


def test_protocol_split_image_vs_tokens():
    adapter = wrap(zoo.get("dino_s16")[0])
    assert isinstance(adapter, Adapter) and isinstance(adapter, TokenAdapter)
    for name in ("embed", "block", "head", "run", "num_blocks", "num_heads", "num_prefix_tokens", "embed_dim"):
        assert hasattr(TokenAdapter, name) or hasattr(adapter, name), name
    for name in ("grid_size", "check_images", "preprocess", "preprocessing"):
        assert hasattr(Adapter, name) and not hasattr(TokenAdapter, name), name


def test_text_adapter_is_a_token_adapter_and_refused_by_the_image_wrap():
    transformers = pytest.importorskip("transformers", reason="the text adapters need transformers")
    from ultra_fast.text import wrap_text
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                  attn_implementation="eager")
    adapter = wrap_text(transformers.GPT2Model(cfg).eval())
    assert isinstance(adapter, TokenAdapter) and not isinstance(adapter, Adapter)
    ids = torch.arange(6).unsqueeze(0)
    with torch.no_grad():
        zs = adapter.hidden_states(ids)
        by_hand, _ = _by_hand(adapter, ids, adapter.num_blocks)
    assert len(zs) == adapter.num_blocks + 1 and all(torch.equal(a, b) for a, b in zip(zs, by_hand))
    with pytest.raises(UnsupportedModelError, match="ultra_fast.text"):
        wrap(adapter)

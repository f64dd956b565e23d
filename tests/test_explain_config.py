"""``ExplainConfig``: one frozen, validated options object behind ``explain``, the references and ``segment``."""
import dataclasses

import pytest
import torch

import ultra_fast
from ultra_fast import ExplainConfig, explain, explain_naive, explain_with, wrap
from ultra_fast.engine import explain_rows, explain_rows_with
from ultra_fast.errors import ConfigError
from ultra_fast.segmentation import segment

import models_zoo as zoo


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer=0), "layer=0"),
    (dict(layer=True), "layer=True"),
    (dict(layer="last"), "layer='last'"),
    (dict(start_block=0), "start_block"),
    (dict(order="forward"), "order"),
    (dict(scalar="entropy"), "scalar"),
    (dict(scalar="learned"), "weights"),
    (dict(weights=[1.0, 2.0]), "weights"),
    (dict(targets="cls"), "targets"),
    (dict(size=(8, 0)), "size"),
    (dict(size="half"), "size"),
    (dict(interpolation="nearest"), "interpolation"),
    (dict(backend="cuda"), "backend"),
    (dict(backward="jvp"), "backward"),
    (dict(memory_budget=0), "memory_budget"),
    (dict(memory_budget="1G"), "memory_budget"),
    (dict(compute_dtype="bf16"), "unknown compute_dtype 'bf16'"),
    (dict(compute_dtype=torch.int8), "not supported"),
])
def test_bad_options_are_refused_with_the_option_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ExplainConfig(**kwargs)


def test_frozen_replace_and_kwargs_round_trip():
    cfg = ExplainConfig(layer=3, scalar="energy", compute_dtype="exact", memory_budget=1e8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layer = 4
    assert cfg.compute_dtype is None  # stored parsed: "exact" is the exact mode
    assert ExplainConfig(compute_dtype="bfloat16").compute_dtype is torch.bfloat16
    other = cfg.replace(layer=4, order="paper")
    assert (other.layer, other.order, other.scalar, cfg.layer) == (4, "paper", "energy", 3)
    with pytest.raises(ConfigError, match="start_block"):
        cfg.replace(start_block=-1)  # validated again
    with pytest.raises(ConfigError, match=r"unknown explain option\(s\) \['layers'\]"):
        cfg.replace(layers=2)
    with pytest.raises(ConfigError, match="'depth'"):
        ExplainConfig.from_kwargs(depth=2)
    again = ExplainConfig(**cfg.kwargs())
    assert again.kwargs() == cfg.kwargs()
    assert set(cfg.kwargs()) == set(ExplainConfig.field_names())


def test_config_and_keyword_facade_give_identical_maps():
    model, size = zoo.get("dino_s16")
    x = zoo.images(size, batch=2)
    kw = dict(layer=-2, start_block=2, order="paper", targets=[0, 3, 7], size=(20, 24), interpolation="bicubic",
              self_max=False, backend="torch", memory_budget=1 << 20)
    cfg = ExplainConfig(**kw)
    assert torch.equal(explain_with(model, x, cfg), explain(model, x, **kw))
    adapter = wrap(model)
    rows_kw = {k: v for k, v in kw.items() if k not in ("size", "interpolation", "self_max")}
    a, ia = explain_rows_with(adapter, x, cfg)
    b, ib = explain_rows(adapter, x, **rows_kw)
    assert torch.equal(a, b) and torch.equal(ia, ib)
    # the references take the same options through the same validation
    ref = explain_naive(model, x, **{k: v for k, v in kw.items() if k not in ("backend", "memory_budget")})
    assert (explain_with(model, x, cfg) - ref).abs().max() <= 1e-9 * ref.abs().max()


def test_bad_options_are_refused_before_any_work(monkeypatch):
    model, size = zoo.get("dino_s16")
    x = zoo.images(size, batch=1)
    adapter = wrap(model)
    calls = []
    monkeypatch.setattr(type(adapter), "embed", lambda self, *a: calls.append(1))
    for fn in (explain, explain_naive, ultra_fast.explain_authors):
        with pytest.raises(ConfigError, match="order"):
            fn(adapter, x, order="forward")
    with pytest.raises(ConfigError, match="backward"):
        segment(adapter, x, backward="jvp")
    with pytest.raises(ConfigError, match="unknown explain option"):
        segment(adapter, x, layers=3)
    assert calls == []


def test_segment_takes_a_config():
    model, size = zoo.get("dino_s16", torch.float32)
    x = zoo.images(size, batch=1, dtype=torch.float32)
    cfg = ExplainConfig(layer=-2, start_block=2)
    a = segment(model, x, n_clusters=2, threshold=None, config=cfg)[0]
    b = segment(model, x, n_clusters=2, threshold=None, layer=-2, start_block=2)[0]
    c = segment(model, x, n_clusters=2, threshold=None, config=ExplainConfig(layer=5), start_block=2, layer=-2)[0]
    for other in (b, c):  # keyword options go on top of the config
        assert (a.labels == other.labels).all() and (a.cluster_maps == other.cluster_maps).all()
    with pytest.raises(ConfigError, match="patch tokens"):
        segment(model, x, config=cfg.replace(targets="all"))

"""What the exactness tests compare with: one error measure and one non-linear scalar, shared."""
import torch

from ultra_fast import explain, explain_naive, wrap


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale (``b``); refuses a vacuous comparison."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    scale = b.abs().max().item()
    assert scale > 0, "reference maps are all zero: the comparison would be vacuous"
    return (a - b).abs().max().item() / scale


def cubic(z: torch.Tensor) -> torch.Tensor:
    """A user-defined scalar: the cube of the first half of the channels, summed (not linear in z)."""
    return (z[..., : z.shape[-1] // 2] ** 3).sum(-1)


def learned_weights(model, size) -> torch.Tensor:
    """A random Θ (tokens, d) in float64 for ``scalar="learned"`` on ``size`` (H, W) inputs of ``model``."""
    adapter = wrap(model)
    ph, pw = adapter.preprocessing.patch_size
    n = adapter.num_prefix_tokens + (size[0] // ph) * (size[1] // pw)
    return torch.randn(n, adapter.embed_dim, dtype=torch.float64)


def engine_vs_naive(model, x: torch.Tensor, **kw) -> float:
    """``rel_err`` of ``explain`` against the naive one-backward-per-token ``explain_naive`` with the same
    options; checks the engine's dtype and, for a target list, that every target got a map."""
    fast = explain(model, x, **kw)
    assert fast.dtype == x.dtype and fast.shape[0] == x.shape[0]
    if isinstance(kw.get("targets"), list):
        assert fast.shape[1] == len(kw["targets"])
    return rel_err(fast, explain_naive(model, x, **kw))


def mixed_targets(model, prefix: str = "first") -> list:
    """Targets out of order across token kinds: the first prefix token (``prefix="first"``) or all of them
    (``"all"``; none for a model without prefix tokens), then patches 2, 0, 1."""
    P = wrap(model).num_prefix_tokens
    head = [0] if prefix == "first" else list(range(P))
    return head + [P + 2, P, P + 1]

"""Aggregation strategies (ultra_fast.segmentation.aggregation / artifacts) on constructed maps with a
known answer: two blocks of mutually relevant tokens are split; an artefact token is neutralised."""
import numpy as np
import pytest
import torch

from ultra_fast.errors import InputError
from ultra_fast.segmentation import AGGREGATIONS, segment_maps, token_partition
from ultra_fast.segmentation.aggregation import (
    RefinedCut,
    SpectralCut,
    aggregate,
    parse_aggregation,
    propagated_features,
)
from ultra_fast.segmentation.artifacts import artefact_tokens, fill_from_nearest, neutralise_columns

H, W = 6, 6
LEFT = (np.arange(H * W) % W) < W // 2   # two blocks: the left and the right half of the grid


def _two_blocks(seed=0, noise=0.15):
    """(36, 6, 6) maps: every token draws on its own half (1) more than on the other (0.1), plus noise;
    features: one direction per half plus noise, equal norms."""
    rng = np.random.default_rng(seed)
    same = LEFT[:, None] == LEFT[None, :]
    R = np.where(same, 1.0, 0.1) + noise * rng.random((H * W, H * W))
    f = np.stack([LEFT, ~LEFT], 1).astype(np.float64) * 5 + 0.5 * rng.standard_normal((H * W, 2))
    feats = np.concatenate([f, 0.5 * rng.standard_normal((H * W, 6))], 1)
    feats *= 10 / np.linalg.norm(feats, axis=1, keepdims=True)
    return torch.from_numpy(R.reshape(H * W, H, W)), feats


def _is_split(ids):
    ids = np.asarray(ids).reshape(-1)
    return len(np.unique(ids)) == 2 and len(np.unique(ids[LEFT])) == 1 and len(np.unique(ids[~LEFT])) == 1


@pytest.mark.parametrize("name", AGGREGATIONS)
def test_every_strategy_splits_two_blocks_of_mutually_relevant_tokens(name):
    maps, feats = _two_blocks()
    seg = segment_maps(maps, (12, 12), n_clusters=2, aggregation=name, features=feats, assign="token")
    assert _is_split(seg.token_clusters)
    # the pixel rule follows: each half of the image is one segment
    assert len(np.unique(seg.labels[:, :6])) == 1 and len(np.unique(seg.labels[:, 6:])) == 1


@pytest.mark.parametrize("name", ["spectral", "joint", "spectral+clean"])
def test_spectral_eigengap_finds_the_two_blocks(name):
    maps, feats = _two_blocks(1)
    part = token_partition(maps, aggregation=name, features=feats)
    assert _is_split(part.cut())                     # no count given: the eigengap rule
    assert part.linkage.shape == (0, 4)


class _FixedCut:
    """A stand-in for ``TokenClustering``: its cut is given (to start the refinement from a known state)."""

    def __init__(self, ids):
        self.ids = np.asarray(ids, dtype=np.int64)

    def cut(self, threshold=0.4, n_clusters=None):
        return self.ids.copy()


def test_refined_moves_a_misplaced_token_to_the_nearest_cluster_mean():
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.normal([0, 0], 0.1, (10, 2)), rng.normal([5, 5], 0.1, (10, 2))])
    start = np.r_[np.zeros(10), np.ones(10)].astype(np.int64)
    start[3] = 1                                     # the paper's cut put token 3 with the other block
    ids = RefinedCut(rows, _FixedCut(start)).cut(0.4)
    assert ids.tolist() == [0] * 10 + [1] * 10       # back with its block; ids keep the start's order
    assert RefinedCut(rows, _FixedCut(np.zeros(20, np.int64))).cut().tolist() == [0] * 20  # one cluster stays


def test_refined_and_propagated_keep_the_papers_count_at_every_threshold():
    maps, feats = _two_blocks(3)
    paper = token_partition(maps, aggregation="paper")
    for name in ("refined", "propagated"):
        part = token_partition(maps, aggregation=name, features=feats)
        np.testing.assert_array_equal(part.linkage, paper.linkage)   # the same dendrogram starts it
        for z in (0.05, 0.2, 0.4, 0.8):
            assert part.cut(z).max() == paper.cut(z).max()


def test_propagated_features_hand_case():
    feats = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    maps = np.array([[0.0, 1.0, 0.0],                # token 0 draws only on token 1
                     [1.0, 0.0, 1.0],                # token 1 on tokens 0 and 2 equally
                     [0.0, 0.0, 0.0]])               # token 2 on nothing: uniform weights
    out = propagated_features(maps, np.arange(3), feats)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(out, [unit[1], (unit[0] + unit[2]) / 2, unit.mean(0)], atol=1e-12)


def _with_artefact(seed=2):
    """Two blocks, and one token inside the left block that behaves like a register-less ViT's artefact:
    a huge feature norm, a map that points at the right block (the 'object') from where it lies, and a
    column every token draws on."""
    maps, feats = _two_blocks(seed, noise=0.05)
    R = maps.reshape(H * W, H * W).clone()
    a = 2 * W + 1                                    # row 2, column 1: inside the left block
    R[a] = torch.where(torch.from_numpy(LEFT), 0.1, 1.0)
    R[:, a] = 3.0                                    # everyone draws on the artefact patch
    feats = feats.copy()
    feats[a] = 0.0
    feats[a, 2] = 80.0
    return R.reshape(H * W, H, W), feats, a


@pytest.mark.parametrize("base", ["paper", "spectral", "joint", "refined", "propagated"])
def test_an_artefact_token_is_neutralised(base):
    maps, feats, a = _with_artefact()
    plain = token_partition(maps, aggregation=base, features=feats).cut(n_clusters=2)
    clean_part = token_partition(maps, aggregation=base + "+clean", features=feats)
    clean = clean_part.cut(n_clusters=2)
    # without handling, the artefact's map sends it to the right block's cluster
    assert plain[a] == plain[~LEFT][0] and plain[a] != plain[LEFT & (np.arange(H * W) != a)][0]
    # with it: flagged from the norms alone, clustered with its neighbours, left out of the sums
    assert _is_split(clean)
    assert not clean_part.summed[a] and clean_part.summed.sum() == H * W - 1
    # its column no longer stands out in any map
    assert clean_part.maps[:, a].max() <= clean_part.maps[:, [a - 1, a + 1]].max() + 1e-12


def test_artefact_tokens_are_the_norm_outliers_only():
    rng = np.random.default_rng(0)
    norms = 50 + 2 * rng.standard_normal(256)
    assert not artefact_tokens(norms).any()          # a tight unimodal distribution: none
    norms[[7, 100]] = 200
    assert np.flatnonzero(artefact_tokens(norms)).tolist() == [7, 100]
    norms[:40] = 400                                 # more than 10 %: only the largest 25 (10 %) flagged
    assert artefact_tokens(norms).sum() == 25
    with pytest.raises(ValueError, match="non-finite"):
        artefact_tokens(np.array([1.0, np.nan, 2.0]))


def test_neutralise_columns_and_fill_from_nearest_hand_cases():
    maps = np.arange(2 * 9, dtype=np.float64).reshape(2, 9)  # 3 x 3 grid
    out = neutralise_columns(maps, [4], (3, 3))               # centre <- mean of its 8 neighbours
    np.testing.assert_allclose(out[:, 4], maps[:, [0, 1, 2, 3, 5, 6, 7, 8]].mean(1))
    np.testing.assert_array_equal(np.delete(out, 4, 1), np.delete(maps, 4, 1))
    kept = np.ones(9, bool)
    kept[[4, 8]] = False
    ids = fill_from_nearest(np.array([0, 0, 1, 0, 1, 0, 1]), kept, np.arange(9), (3, 3))
    # patch 4 (centre): nearest kept at distance 1 are 1, 3, 5, 7; the smallest patch (1) wins -> id 0
    # patch 8 (corner): nearest kept are 5 and 7 -> 5 (id 1)
    assert ids.tolist() == [0, 0, 1, 0, 0, 1, 0, 1, 1]


def test_spectral_cut_is_deterministic_and_checks_its_input():
    maps, _ = _two_blocks(3)
    R = maps.reshape(36, 36).numpy()
    a, b = SpectralCut((R + R.T) / 2), SpectralCut((R + R.T) / 2)
    for k in (2, 3, 7):
        np.testing.assert_array_equal(a.cut(n_clusters=k), b.cut(n_clusters=k))
        assert len(np.unique(a.cut(n_clusters=k))) == k
    assert len(np.unique(a.cut(n_clusters=36))) == 36   # beyond the first eigenvectors: solved once more
    with pytest.raises(ValueError, match="non-negative"):
        SpectralCut(-np.ones((3, 3)))
    with pytest.raises(ValueError, match="impossible"):
        a.cut(n_clusters=37)


def test_bad_names_and_missing_features_are_refused():
    maps, feats = _two_blocks()
    with pytest.raises(ValueError, match="unknown aggregation 'kmeans'"):
        parse_aggregation("kmeans")
    with pytest.raises(ValueError, match="needs the tokens' features"):
        segment_maps(maps, (6, 6), aggregation="joint")
    with pytest.raises(ValueError, match=r"features must be \(n = 36, D\)"):
        segment_maps(maps, (6, 6), aggregation="joint", features=feats[:5])
    flat = maps.reshape(36, 36).numpy()
    with pytest.raises(ValueError, match="beta must lie in"):
        aggregate(flat, (6, 6), "joint", features=feats, beta=1.5)
    assert issubclass(InputError, ValueError)


def test_strided_subset_with_clean_keeps_positions():
    maps, feats, a = _with_artefact()
    keep = np.union1d(np.arange(0, 36, 2), [a])     # every other patch, and the artefact (13)
    sub = maps[torch.from_numpy(keep)]
    seg = segment_maps(sub, (6, 6), n_clusters=2, aggregation="paper+clean", features=feats[keep],
                       token_positions=keep, assign="token")
    ids = seg.token_clusters.reshape(-1)[keep]      # the explained tokens (the others: nearest explained)
    assert len(np.unique(ids[LEFT[keep]])) == 1 and len(np.unique(ids[~LEFT[keep]])) == 1
    assert ids[LEFT[keep]][0] != ids[~LEFT[keep]][0]


# ---------------------------------------------------------------------------------------------------------
# Text, the same spirit: attention-sink tokens handled as prefix tokens


def test_text_sink_tokens_are_prefix_columns_and_rows_are_scaled():
    from ultra_fast.errors import ConfigError
    from ultra_fast.text.contributions import contributions, tokenize_pair

    from test_text import CONTEXT, SUMMARY, naive_rows, tiny, word_tokenizer
    tok = word_tokenizer([CONTEXT, SUMMARY, "\nTL;DR: "])
    model = tiny("llama")
    plain = tokenize_pair(tok, CONTEXT, SUMMARY)
    pair = tokenize_pair(tok, CONTEXT, SUMMARY, sink_tokens=2)
    ctx, summ = pair.positions("context"), pair.positions("summary")
    assert pair.positions("prefix") == [0, 1] and ctx == plain.positions("context")[2:]
    c = contributions(model, tok, CONTEXT, SUMMARY, layer=-1, scalar="sum", sink_tokens=2)
    assert len(c.scores) == len(ctx) and c.extra["sink_tokens"] == 2
    rows, _ = naive_rows(model, torch.tensor([pair.input_ids]), layer=-1, scalar="sum", targets=summ)
    m = rows[0][:, ctx]
    ref = (m / m.abs().amax(1, keepdim=True)).mean(0)   # every summary row weighs the same
    assert (c.scores - ref).abs().max().item() <= 1e-9
    with pytest.raises(ConfigError, match="sink_tokens"):
        tokenize_pair(tok, CONTEXT, SUMMARY, sink_tokens=-1)


# ---------------------------------------------------------------------------------------------------------
# The evaluation sweep: every strategy at the paper's segment counts, from maps computed once


def test_harness_compares_strategies_at_equal_counts_from_cached_maps(tmp_path, explain_spy):
    from ultra_fast.evaluation.harness import EvalConfig, run_evaluation

    import models_zoo
    from conftest import two_image_folder_dataset
    model, _ = models_zoo.get("dino_s16", torch.float32)
    ds = two_image_folder_dataset(tmp_path / "d")
    base = dict(size=(48, 64), scalars=("sum",), thresholds=(0.3, 0.5), taus=(), perturbation=False,
                baselines=("kmeans",))
    cache = tmp_path / "maps"
    paper = run_evaluation(model, ds, EvalConfig(**base), tmp_path / "a", progress=False, maps_cache=cache)
    assert len(explain_spy) == 2 and paper["itiou"] == []          # one explain per image; no ITIoU asked
    res = run_evaluation(model, ds, EvalConfig(**base, aggregations=("paper", "spectral", "joint+clean")),
                         tmp_path / "b", progress=False, maps_cache=cache)
    assert len(explain_spy) == 2                                    # the sweep re-used the cached maps
    for protocol in ("per-image", "dataset"):
        rows = res["segmentation"][protocol]
        key = lambda r: (r["method"], r["aggregation"], r["baseline"], r["assign"], r["threshold"])  # noqa: E731
        old = {key(r): r for r in paper["segmentation"][protocol]}
        for r in rows:                                              # the paper's rows are unchanged
            if key(r) in old:
                assert r["mIoU"] == old[key(r)]["mIoU"] and r["mean_segments"] == old[key(r)]["mean_segments"]
        for z in (0.3, 0.5):  # every method cut to the paper's count: equal segments under the token rule
            counts = {(r["aggregation"] or r["method"]): r["mean_segments"] for r in rows
                      if r["threshold"] == z and r["assign"] in ("token", None)}
            assert set(counts) == {"paper", "spectral", "joint+clean", "k-means", "feature spectral"}
            assert len(set(counts.values())) == 1, counts
        assert any(r["threshold"] == "auto" and r["aggregation"] == "spectral" for r in rows)
    md = (tmp_path / "b" / "results.md").read_text()
    assert "## Aggregations at equal segment counts" in md and "feature spectral (features)" in md
    assert (tmp_path / "b" / "aggregations.png").is_file()


# ---------------------------------------------------------------------------------------------------------
# The batch runner's settings


def test_runner_settings_take_an_aggregation_and_cluster_once(monkeypatch):
    from ultra_fast.errors import ConfigError
    from ultra_fast.segmentation import run as runner
    s = runner.SegmentSettings()
    assert "aggregation" not in s.to_json()             # older run.json files stay valid at the default
    j = runner.SegmentSettings(aggregation="joint", n_clusters=2, threshold=None)
    j.validate()
    assert j.to_json()["aggregation"] == "joint"
    with pytest.raises(ConfigError, match="unknown aggregation 'ward'"):
        runner.SegmentSettings(aggregation="ward").validate()
    maps, feats = _two_blocks()
    calls = []
    real = runner.token_partition
    monkeypatch.setattr(runner, "token_partition", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = runner.segment_one(maps, (24, 24), j, features=feats)
    assert len(calls) == 1 and _is_split(res.token_clusters)   # both resolutions from one partition
    ref = segment_maps(maps, (24, 24), n_clusters=2, aggregation="joint", features=feats)
    np.testing.assert_array_equal(res.labels, ref.labels)

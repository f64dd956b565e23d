"""Segmentation from token maps (docs/method.md §4) on constructed maps whose right answer is known."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ultra_fast.segmentation import cluster_tokens, min_max, segment_maps
from ultra_fast.segmentation.segment import nearest_token


def two_region_maps(h=4, w=6):
    """Tokens of the left half explain the left half, tokens of the right half the right half."""
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1.0
    maps = []
    g = torch.Generator().manual_seed(0)
    for r in range(h):
        for c in range(w):
            base = left if c < w // 2 else 1 - left
            maps.append(base + 0.05 * torch.rand(h, w, generator=g))
    return torch.stack(maps).double()


@pytest.mark.parametrize("assign", ["argmax", "token"])
def test_two_regions_are_found(assign):
    maps = two_region_maps()
    seg = segment_maps(maps, (40, 60), threshold=0.4, assign=assign)
    assert seg.labels.shape == (40, 60) and seg.num_segments == 2
    assert len(np.unique(seg.labels[:, :30])) == 1 and len(np.unique(seg.labels[:, 30:])) == 1
    assert seg.labels[0, 0] != seg.labels[0, -1]
    assert seg.linkage.shape == (23, 4) and seg.cluster_maps.shape == (2, 40, 60)


def test_fixed_number_of_clusters_and_threshold_extremes():
    maps = two_region_maps()
    for k in (1, 2, 5):
        assert segment_maps(maps, (8, 12), threshold=None, n_clusters=k).token_clusters.max() + 1 == k
    assert segment_maps(maps, (8, 12), threshold=2.0).num_segments == 1


@pytest.mark.parametrize("kw", [dict(threshold=0), dict(threshold=2.5), dict(threshold=None),
                                dict(n_clusters=0), dict(n_clusters=25)])
def test_impossible_cuts_are_refused(kw):
    with pytest.raises(ValueError, match="impossible"):
        segment_maps(two_region_maps(), (8, 12), **kw)


def test_token_rule_is_the_nearest_upsampled_token_clusters():
    maps = torch.rand(12, 3, 4, dtype=torch.float64)
    seg = segment_maps(maps, (30, 40), n_clusters=3, threshold=None, assign="token")
    expect = F.interpolate(torch.from_numpy(seg.token_clusters)[None, None].double(), size=(30, 40),
                           mode="nearest")[0, 0].numpy()
    assert np.array_equal(seg.labels, expect)


def test_cluster_maps_equal_summing_upsampled_maps():
    maps = torch.rand(12, 3, 4, dtype=torch.float64)
    seg = segment_maps(maps, (17, 23), n_clusters=3, threshold=None)
    scaled = torch.from_numpy(min_max(maps.reshape(12, -1).numpy())).reshape(12, 3, 4)
    up = F.interpolate(scaled[:, None], size=(17, 23), mode="bilinear", align_corners=False)[:, 0]
    ids = torch.from_numpy(seg.token_clusters.ravel())
    for c in range(3):
        s = up[ids == c].sum(0)
        s = (s - s.min()) / (s.max() - s.min())
        assert torch.allclose(torch.from_numpy(seg.cluster_maps[c]).double(), s, atol=1e-6)
    assert np.array_equal(seg.labels, seg.cluster_maps.argmax(0))


def test_constant_maps_do_not_break_cosine_clustering():
    maps = np.ones((6, 8))
    ids, Z = cluster_tokens(maps)
    assert np.isfinite(Z).all() and ids.max() == 0
    with pytest.raises(ValueError, match="all 12 patch tokens"):
        segment_maps(torch.rand(5, 3, 4), (8, 8))


# ---------------------------------------------------------------------------------------------------------
# Fast mode: maps of a strided subset of the tokens (token_positions)

def _same(a, b):
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.token_clusters, b.token_clusters)
    assert np.array_equal(a.cluster_maps, b.cluster_maps) and np.array_equal(a.linkage, b.linkage)


@pytest.mark.parametrize("assign", ["argmax", "token"])
def test_stride_one_positions_equal_the_plain_call(assign):
    maps = torch.rand(12, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain = segment_maps(maps, (29, 41), n_clusters=3, threshold=None, assign=assign)
    as_index = segment_maps(maps, (29, 41), n_clusters=3, threshold=None, assign=assign,
                            token_positions=np.arange(12))
    as_rc = segment_maps(maps, (29, 41), n_clusters=3, threshold=None, assign=assign,
                         token_positions=[(r, c) for r in range(3) for c in range(4)])
    _same(plain, as_index)
    _same(plain, as_rc)
    assert plain.token_positions is None and as_index.token_positions.tolist() == as_rc.token_positions.tolist()


# Stride 2 on a 4 x 4 grid explains patches (0,0) (0,2) (2,0) (2,2): indices 0, 2, 8, 10.
STRIDED = [0, 2, 8, 10]


def _four_distinct_maps():
    """Four maps with clearly different supports, one cluster each at n_clusters=4."""
    maps = torch.full((4, 4, 4), 0.01, dtype=torch.float64)
    for k, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        maps[k, r:r + 2, c:c + 2] = 1.0
    return maps


def test_nearest_token_hand_case():
    pos = np.array([[0, 0], [0, 2], [2, 0], [2, 2]])
    # 8 x 8 pixels over the 4 x 4 grid: pixel centre rows (y + 1/2)/2 = 0.25, 0.75, 1.25 | 1.75, ...; the
    # explained centre rows are 0.5 and 2.5, so rows 0-2 go to row 0 and rows 3-7 to row 2 (columns alike)
    quad = np.zeros((8, 8), int)
    quad[:, 3:] += 1
    quad[3:, :] += 2
    assert nearest_token(pos, (4, 4), (8, 8)).tolist() == quad.tolist()
    # at grid resolution, ties (patch (0,1) is as near to (0,0) as to (0,2)) go to the smaller patch index
    assert nearest_token(pos, (4, 4), (4, 4)).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    # the order of the given positions does not change which patch wins a tie
    rev = nearest_token(pos[::-1].copy(), (4, 4), (4, 4))
    assert (3 - rev).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_strided_token_rule_takes_the_nearest_explained_tokens_cluster():
    maps = _four_distinct_maps()
    seg = segment_maps(maps, (8, 8), threshold=None, n_clusters=4, assign="token", token_positions=STRIDED)
    ids = seg.token_clusters.reshape(-1)[STRIDED]      # explained patches keep their own cluster
    assert sorted(ids.tolist()) == [0, 1, 2, 3]
    quad = np.zeros((8, 8), int)
    quad[:, 3:] += 1
    quad[3:, :] += 2
    assert seg.labels.tolist() == ids[quad].tolist()
    assert seg.token_clusters.tolist() == ids[np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3],
                                                        [2, 2, 3, 3]])].tolist()
    assert seg.token_positions.tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]] and seg.linkage.shape == (3, 4)


def test_strided_argmax_sums_only_the_explained_maps():
    maps = _four_distinct_maps()
    maps[3] = maps[2] + 0.02                              # tokens 2 and 3 now explain the same region
    seg = segment_maps(maps, (8, 8), threshold=None, n_clusters=3, token_positions=STRIDED)
    ids = seg.token_clusters.reshape(-1)[STRIDED]
    assert ids[2] == ids[3] and len(set(ids.tolist())) == 3
    scaled = torch.from_numpy(min_max(maps.reshape(4, -1).numpy())).reshape(4, 4, 4)
    up = F.interpolate(scaled[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    s = up[2] + up[3]
    s = (s - s.min()) / (s.max() - s.min())
    assert torch.allclose(torch.from_numpy(seg.cluster_maps[ids[2]]).double(), s, atol=1e-6)
    assert np.array_equal(seg.labels, seg.cluster_maps.argmax(0))


@pytest.mark.parametrize("pos, err, word", [([0, 2, 8], ValueError, "3 token_positions for 4 maps"),
                                            ([0, 2, 8, 16], ValueError, "0..15"),
                                            ([0, 2, 2, 10], ValueError, "repeat"),
                                            ([(0, 0), (0, 2), (2, 0), (2, 4)], ValueError, "4x4 grid"),
                                            (np.zeros((4, 3), int), ValueError, "shape"),
                                            ([0.0, 2.0, 8.0, 10.0], TypeError, "integers")])
def test_bad_token_positions_are_refused(pos, err, word):
    with pytest.raises(err, match=word):
        segment_maps(_four_distinct_maps(), (8, 8), token_positions=pos)


def test_segment_with_a_target_stride_explains_the_strided_tokens_only():
    from ultra_fast import explain
    from ultra_fast.segmentation import segment

    import models_zoo
    model, size = models_zoo.get("dino_s16", torch.float32)           # 48 x 64 -> a 3 x 4 grid
    x = models_zoo.images(size, batch=1, dtype=torch.float32)
    segs = segment(model, x, sizes=[(30, 40)], n_clusters=2, threshold=None, assign="token", target_stride=2,
                   start_block=2)
    maps = explain(model, x, targets=[1, 3, 9, 11], start_block=2)[0]  # CLS first: patches 0, 2, 8, 10
    expect = segment_maps(maps, (30, 40), threshold=None, n_clusters=2, assign="token",
                          token_positions=[0, 2, 8, 10])
    _same(segs[0], expect)
    _same(segment(model, x, n_clusters=2, threshold=None, target_stride=1)[0],
          segment(model, x, n_clusters=2, threshold=None)[0])
    with pytest.raises(ValueError, match="target_stride"):
        segment(model, x, target_stride=0)

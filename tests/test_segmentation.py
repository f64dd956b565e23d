"""Segmentation from token maps (SPEC §4) on constructed maps whose right answer is known."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ultra_fast.segmentation import cluster_tokens, min_max, segment_maps


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

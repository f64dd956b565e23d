"""Cluster once, cut many: ``TokenClustering`` and its use by ``segment_maps``, the harness and the runner.

A sweep over ζ and pixel rules must compute one linkage per (image, scalar, layer) and give exactly the
segmentations that one linkage per cut gave.
"""
import numpy as np
import pytest
import torch

from ultra_fast.evaluation.harness import EvalConfig, run_evaluation
from ultra_fast.segmentation import TokenClustering, cluster_tokens, min_max, segment_maps, token_partition
from ultra_fast.segmentation.cluster import cut, linkage

import models_zoo


@pytest.fixture
def linkage_spy(monkeypatch):
    """Counts fastcluster linkages (the only linkage the package computes) while the real one runs."""
    import fastcluster
    real = fastcluster.linkage
    calls = []

    def spy(*args, **kwargs):
        calls.append(np.asarray(args[0]).shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastcluster, "linkage", spy)
    return calls


def _maps(seed=0, n=36):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 6, 6, generator=g, dtype=torch.float64) ** 3


def test_cuts_of_one_clustering_equal_fresh_clusterings():
    flat = min_max(_maps().reshape(36, -1).numpy())
    tc = TokenClustering(flat)
    for z in (0.1, 0.25, 0.4, 0.6):
        ids, Z = cluster_tokens(flat, threshold=z)
        np.testing.assert_array_equal(tc.cut(z), ids)
        np.testing.assert_array_equal(tc.Z, Z)
    for k in (1, 2, 5, 36):
        np.testing.assert_array_equal(tc.cut(n_clusters=k), cut(linkage(flat), n_clusters=k))
    assert TokenClustering(flat[:1]).cut(0.4).tolist() == [0]


def test_segment_maps_with_a_shared_partition_is_identical_and_links_once(linkage_spy):
    maps = _maps(1)
    part = token_partition(maps)
    assert len(linkage_spy) == 1
    for z in (0.2, 0.4, 0.5):
        for assign in ("argmax", "token"):
            shared = segment_maps(maps, (20, 30), threshold=z, assign=assign, partition=part)
            fresh = segment_maps(maps, (20, 30), threshold=z, assign=assign)
            np.testing.assert_array_equal(shared.labels, fresh.labels)
            np.testing.assert_array_equal(shared.cluster_maps, fresh.cluster_maps)
            np.testing.assert_array_equal(shared.linkage, fresh.linkage)
    assert len(linkage_spy) == 1 + 6  # the shared partition once, each fresh call once
    with pytest.raises(ValueError, match="partition is of 36 maps"):
        segment_maps(_maps(2, n=16)[:, :4, :4], (8, 8), partition=part)


def test_harness_sweep_links_once_per_image_scalar_and_layer(tmp_path, linkage_spy):
    from conftest import two_image_folder_dataset
    model, _ = models_zoo.get("dino_s16", torch.float32)
    ds = two_image_folder_dataset(tmp_path / "d")
    config = EvalConfig(size=(48, 64), scalars=("sum", "norm"), layers=(-2, -1), thresholds=(0.25, 0.3, 0.4, 0.5),
                        taus=(0.2,), perturbation=False, baselines=("kmeans",))
    res = run_evaluation(model, ds, config, tmp_path / "out", progress=False)
    # 2 images x 2 scalars x 2 layers, each swept over 4 ζ x 2 rules: 8 linkages, not 64
    assert len(linkage_spy) == 2 * 2 * 2
    assert len([r for r in res["segmentation"]["per-image"] if r["method"] == "ULTra"]) == 2 * 2 * 4 * 2

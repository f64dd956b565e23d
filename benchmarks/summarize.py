"""Markdown tables from a pytest-benchmark JSON of benchmarks/bench_engine.py.

    python benchmarks/summarize.py bench.json [> table.md]

One table per group (geometry × device): each implementation's best time, its ratio to
ultra_fast[native] fp32 in the same group (e.g. "authors 24.1×" means 24.1 times slower),
achieved GFLOP/s and utilisation (fast engine rows only), and peak memory. Segmentation groups
report images/s.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

ORDER = ["ultra_fast[native]", "ultra_fast[torch]", "ultra_fast[bf16]", "naive_loop", "authors"]
REFERENCE = ("ultra_fast[native]", "float32")


def load(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"summarize: no such file: {path}")
    except json.JSONDecodeError as e:
        raise SystemExit(f"summarize: {path} is not JSON ({e})")
    if "benchmarks" not in data:
        raise SystemExit(f"summarize: {path} has no 'benchmarks' list; write it with pytest --benchmark-json")
    return data


def _impl(bench: dict) -> str:
    return bench.get("extra_info", {}).get("impl") or bench.get("params", {}).get("impl") or bench["name"]


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _mib(b: Optional[float]) -> str:
    return "—" if b is None else f"{b / 2 ** 20:,.0f} MiB"


def _ratio(t: float, ref: Optional[float]) -> str:
    if ref is None:
        return "—"
    fmt = lambda v: f"{v:.1f}×" if v >= 10 else f"{v:.2f}×"  # noqa: E731
    r = t / ref
    return fmt(r) if r >= 1 else f"{r:.2f}× ({fmt(1 / r)} faster)"


def group_table(benches: List[dict]) -> List[str]:
    """Rows of one group's markdown table."""
    info = lambda b: b.get("extra_info", {})  # noqa: E731
    if any("images_per_second" in info(b) for b in benches):
        lines = ["| implementation | time / image | images/s | peak memory |", "|---|---:|---:|---:|"]
        for b in benches:
            ips = info(b).get("images_per_second")
            lines.append(f"| {_impl(b)} | {_seconds(b['stats']['min'])} | "
                         f"{'—' if ips is None else f'{ips:.2f}'} | {_mib(info(b).get('peak_memory_bytes'))} |")
        return lines
    ref = next((b["stats"]["min"] for b in benches
                if (_impl(b), info(b).get("dtype", "float32")) == REFERENCE), None)
    rank = {name: i for i, name in enumerate(ORDER)}
    benches = sorted(benches, key=lambda b: (rank.get(_impl(b), len(ORDER)), b["stats"]["min"]))
    lines = ["| implementation | dtype | time (best) | rounds | vs ultra_fast[native] fp32 | GFLOP/s | "
             "utilisation | peak memory |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for b in benches:
        e, t = info(b), b["stats"]["min"]
        gf = e.get("gflops_per_s")
        util = e.get("utilisation")
        util_s = "—" if util is None else f"{100 * util:.1f} %"
        if "utilisation_same_dtype" in e:
            util_s += f" ({100 * e['utilisation_same_dtype']:.1f} % of {e.get('dtype')} mm)"
        lines.append(f"| {_impl(b)} | {e.get('dtype', '?')} | {_seconds(t)} | {b['stats']['rounds']} | "
                     f"{_ratio(t, ref)} | {'—' if gf is None else f'{gf:.1f}'} | {util_s} | "
                     f"{_mib(e.get('peak_memory_bytes'))} |")
    return lines


def summarize(data: dict) -> str:
    groups: Dict[str, List[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b.get("group") or "ungrouped", []).append(b)
    cpu = data.get("machine_info", {}).get("cpu", {})
    uf = data.get("machine_info", {}).get("ultra_fast", {})
    hw = uf.get("hardware", {})
    out = [f"Machine: {hw.get('cpu_model') or cpu.get('brand_raw', '?')} ({cpu.get('count', '?')} logical CPUs"
           f"{', CPU capability ' + hw['cpu_capability'] if 'cpu_capability' in hw else ''}"
           f"{', ' + hw['gpu'] if 'gpu' in hw else ''}; torch {hw.get('torch', '?')}); "
           f"{data.get('datetime', '')}. Times are the best round; utilisation = achieved FLOP/s of the fast "
           f"engine's count over one large fp32 matrix product on the same device.", ""]
    for device, rates in uf.get("matmul_rates", {}).items():
        out += [f"Same-run matrix products on {device}: " + ", ".join(
            f"{k} {r['flops_per_second'] / 1e9:.1f} GFLOP/s ({r['n']}²{'' if r['native'] else ', not native'})"
            for k, r in rates.items()) + ".", ""]
    for name, benches in groups.items():
        out += [f"### {name}", ""] + group_table(benches) + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="pytest --benchmark-json output of benchmarks/bench_engine.py")
    args = p.parse_args(argv)
    sys.stdout.write(summarize(load(args.json)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

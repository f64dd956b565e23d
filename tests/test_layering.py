"""The package's layering, checked on the source (AST; nothing is imported).

Each part of ``ultra_fast`` (a sub-package or a top-level module) has a layer; a part may import only
parts of lower layers. Parts on one layer are independent of each other (no imports between them),
so a cycle between parts is impossible. Inside a part, the modules' import graph must be acyclic too.
Imports inside functions count: a function-local import that dodges a cycle is still a dependency.
"""
import ast
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "ultra_fast"

#: Lowest first. ``ultra_fast/__init__.py`` (the public facade) and ``__main__`` sit above everything.
LAYERS: List[Tuple[str, ...]] = [
    ("errors",),                                              # the exception hierarchy
    ("ops", "io", "distributed", "demo_images"),              # native ops and small utilities
    ("models",),                                              # adapters: a transformer as embed -> blocks
    ("engine", "data"),                                       # explanation maps (+ native ops) | file inputs
    ("segmentation",),                                        # clustering the maps
    ("evaluation", "training", "profiling", "text", "viz"),   # uses of maps and segmentations
    ("pipeline",),                                            # batch runs: manifests, resume, locks
    ("cli",),                                                 # the ``ultra-fast`` command
]
TOP = ("__init__", "__main__")


def _layer_of() -> Dict[str, int]:
    return {part: i for i, parts in enumerate(LAYERS) for part in parts} | {t: len(LAYERS) for t in TOP}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> List[Tuple[str, int]]:
    """Absolute names of the ``ultra_fast`` modules (or module attributes) a file imports, with line numbers."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            if not full.startswith("ultra_fast"):
                continue
            if node.module is None:  # from .. import x: x is a module (or an attribute of the package)
                out.extend((f"{full}.{a.name}", node.lineno) for a in node.names)
            else:
                out.extend((f"{full}.{a.name}", node.lineno) for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names if a.name.startswith("ultra_fast"))
    return out


def _files() -> List[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _existing_module(name: str, modules: Set[str]) -> str:
    """The longest prefix of ``name`` that is a module of the package (``a.b.attr`` -> ``a.b``)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_every_part_has_a_layer():
    layer = _layer_of()
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file()))}
    assert not parts - set(layer), f"declare the layer of {sorted(parts - set(layer))} in LAYERS"


def test_no_upward_or_sideways_import():
    layer = _layer_of()
    bad = []
    for f in _files():
        src = _part(_module_name(f))
        for name, line in _imports(f):
            dst = _part(name)
            if dst == src or dst not in layer:  # within a part, or the package root's own attributes
                continue
            if src in TOP:
                continue
            if layer[dst] >= layer[src]:
                kind = "upward" if layer[dst] > layer[src] else "sideways (same layer)"
                bad.append(f"{f.relative_to(PACKAGE.parent)}:{line}: {src} -> {dst} ({kind})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    modules = {_module_name(f) for f in _files()}
    graph: Dict[str, Set[str]] = defaultdict(set)
    for f in _files():
        src = _module_name(f)
        for name, _ in _imports(f):
            dst = _existing_module(name, modules)
            if dst != src and dst != "ultra_fast" and not src.startswith(dst + "."):  # a package's own __init__
                graph[src].add(dst)
    # Tarjan's strongly connected components: any component with more than one module is a cycle.
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles between modules: {cycles}"


def test_the_checker_sees_violations(tmp_path):
    """The AST reader resolves relative imports (else the tests above could not fail)."""
    f = PACKAGE / "engine" / "explain.py"
    names = [n for n, _ in _imports(f)]
    assert any(n.startswith("ultra_fast.models") for n in names), names
    assert _part("ultra_fast.segmentation.run.x") == "segmentation"


def test_import_loads_the_native_ops_and_stays_light():
    """``import ultra_fast`` registers ``torch.ops.ultra_fast`` (when built) and costs < 1 s beyond torch:
    the heavy optional libraries load only when used."""
    import json
    import os
    import subprocess
    import sys
    code = ("import json, sys, time\n"
            "t0 = time.perf_counter(); import torch; t1 = time.perf_counter()\n"
            "import ultra_fast; t2 = time.perf_counter()\n"
            "print(json.dumps({'torch_s': t1 - t0, 'ultra_fast_s': t2 - t1, 'built': ultra_fast.ops.build_info()['built'],\n"
            "                  'registered': hasattr(torch.ops.ultra_fast, 'rollout_step'),\n"
            "                  'modules': sorted({m.split('.')[0] for m in sys.modules})}))\n")
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["registered"] == info["built"], info  # ops available right after the import when built
    heavy = {"timm", "open_clip", "transformers", "sklearn", "matplotlib", "onnx", "onnxruntime", "skimage",
             "torchvision"} & set(info["modules"])
    assert not heavy, f"import ultra_fast pulls in {sorted(heavy)}"
    # 1 s on an idle machine; a loaded one (shared CI) slows both imports alike, so scale by torch's time
    # (about 3 s idle on the 2-core reference machine).
    limit = max(1.0, info["torch_s"] / 3.0)
    assert info["ultra_fast_s"] < limit, info

"""The floors of the house (spec/ENGINE.md): every import inside mucs_fast points to its own floor
or one below — at module level and inside functions alike — and no package-internal import hides
inside a function (where it would dodge a cycle instead of showing it)."""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "mucs_fast"

# top-level modules and packages of mucs_fast, floor by floor (ground first)
FLOORS = [
    {
        "_io",
        "_version",
        "_C",
        "safe_load",
        "coverage",
        "config",
        "reference",
        "ops",
        "models",
        "functional",
        "params",
        "cache",
        "result",
        "rundir",
    },
    {"data"},
    {"noise", "denoisers"},
    {"unlearn", "score", "adaptive", "sample", "train", "loading", "pipeline"},
    {"parallel", "engine"},
    {"report", "cli_common", "compat", "evaluate", "text_demo"},
    {"cli", "text_cli", "__main__", "__init__"},
]
# inside mucs_fast/data/
DATA_FLOORS = [
    {"checks"},
    {"files", "digits", "reference_folder", "prefetch"},
    {"captions", "emoji"},
    {"source"},
    {"npy", "safetensors_source"},
    {"shards"},
    {"stream"},
    {"pack"},
    {"__init__"},
]


def _floor(floors, name):
    for i, f in enumerate(floors):
        if name in f:
            return i
    raise AssertionError(
        f"{name!r} is on no floor of tests/test_layers.py: add it where it belongs"
    )


def _imports(path: pathlib.Path):
    """(target module parts under mucs_fast, line, inside a function) of every internal import."""
    rel = path.relative_to(PKG).with_suffix("").parts
    package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                mod = base + (node.module.split(".") if node.module else [])
                targets = [mod + [a.name] if not node.module else mod for a in node.names]
            elif (node.module or "").split(".")[0] == "mucs_fast":
                targets = [node.module.split(".")[1:]]
            else:
                continue
        elif isinstance(node, ast.Import):
            targets = [
                a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "mucs_fast"
            ]
        else:
            continue
        for t in targets:
            out.append((t, node.lineno, node.col_offset > 0))
    return rel, out


def _modules():
    return sorted(p for p in PKG.rglob("*.py"))


def test_every_module_is_on_a_floor():
    for p in _modules():
        rel = p.relative_to(PKG).with_suffix("").parts
        _floor(FLOORS, rel[0])
        if rel[0] == "data" and len(rel) > 1:
            _floor(DATA_FLOORS, rel[1])


def test_imports_point_down():
    upward = []
    for p in _modules():
        rel, imports = _imports(p)
        for target, line, _ in imports:
            if not target:  # `from mucs_fast import x` / `from .. import x` names the root package
                target = ["__init__"]
            if target[0] in ("__version__",):
                target = ["__init__"]
            src, dst = _floor(FLOORS, rel[0]), _floor(FLOORS, target[0])
            if rel[0] != target[0] and dst > src:
                upward.append(
                    f"{'/'.join(rel)}.py:{line} imports {'.'.join(target)} (floor {dst} > {src})"
                )
            if rel[0] == target[0] == "data" and len(rel) > 1 and len(target) > 1:
                s, d = _floor(DATA_FLOORS, rel[1]), _floor(DATA_FLOORS, target[1])
                if d > s or (d == s and rel[1] != target[1] and rel[1] != "__init__"):
                    upward.append(
                        f"{'/'.join(rel)}.py:{line} imports data.{target[1]} (data floor {d} ≥ {s})"
                    )
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_no_package_import_inside_a_function():
    local = [
        f"{'/'.join(rel)}.py:{line} imports {'.'.join(t)}"
        for p in _modules()
        for rel, imports in [_imports(p)]
        for t, line, inside in imports
        if inside
    ]
    assert not local, "function-local imports of mucs_fast modules:\n" + "\n".join(local)

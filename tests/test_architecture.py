"""The package's structure, read from its source with ``ast`` (no import needed).

* layers: every module of ``funcprobe/`` is in exactly one layer, and imports (at module
  level or inside functions) point only to its own layer or lower ones;
* no import cycle between modules;
* no function has more than 6 parameters besides ``self``/``cls``/``settings``, except
  where a calling convention outside the package fixes the signature (listed below);
* the pure core knows nothing of ranks, shards or stand-in chunks.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

PACKAGE = Path(__file__).resolve().parent.parent / "funcprobe"

#: lowest first; a module belongs to the layer whose prefix it has (exact name or ``prefix.``)
LAYERS = [
    ("foundation", ("funcprobe.errors", "funcprobe.settings")),
    ("forward-mode operators", ("funcprobe.forward",)),
    ("core", ("funcprobe.core",)),
    ("edge", ("funcprobe.edge",)),
    ("io", ("funcprobe.io",)),
    ("run value", ("funcprobe.run",)),
    ("passes", ("funcprobe.passes",)),
    ("influence", ("funcprobe.influence",)),
    ("control", ("funcprobe.control",)),
    ("api", ("funcprobe.api",)),
    ("validation", ("funcprobe.validation",)),
    ("integrations and apps", ("funcprobe.integrations", "funcprobe.apps")),
    ("package", ("funcprobe", "funcprobe.__main__")),
]

#: signatures fixed outside the package: Triton kernels (flat pointers, strides and
#: constexprs are Triton's calling convention), torch.library custom ops and their fake
#: kernels (an op schema takes flat tensors), torch.autograd.Function methods (autograd
#: tracks tangents of tensor arguments only), and callables whose signature mirrors the API
#: they stand in for
EXEMPT_DECORATORS = {"jit", "_jit", "custom_op", "register_fake"}  # _jit: funcprobe.forward.triton's triton.jit
EXEMPT_FUNCTIONS = {
    "_sdpa_arguments": "mirrors torch.nn.functional.scaled_dot_product_attention's signature",
    "attention": "transformers' attention-interface signature (module, q, k, v, mask, scaling, dropout, **kw)",
}
MAX_PARAMETERS = 6


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The funcprobe modules ``name`` imports anywhere in its source (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "funcprobe":
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in MODULES else target)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "funcprobe"}
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layers_of(name: str) -> list[int]:
    return [i for i, (_, prefixes) in enumerate(LAYERS)
            if any(name == p or (name.startswith(p + ".") and p != "funcprobe") for p in prefixes)]


def test_every_module_is_in_exactly_one_layer_and_imports_point_down():
    for name in MODULES:
        assert len(_layers_of(name)) == 1, f"{name} is in {len(_layers_of(name))} layers of LAYERS (expected one)"
    for name, targets in GRAPH.items():
        (mine,) = _layers_of(name)
        for target in targets:
            (theirs,) = _layers_of(target)
            assert theirs <= mine, (f"{name} ({LAYERS[mine][0]}) imports {target}, a higher layer "
                                    f"({LAYERS[theirs][0]})")


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH.get(name, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def _decorator_names(node: ast.FunctionDef) -> set[str]:
    names = set()
    for d in node.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        names.add(d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", ""))
    return names


def _function_bases(tree: ast.Module) -> dict[ast.FunctionDef, str]:
    """function node → the source of its class's first base ('' outside a class)."""
    owner = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            base = ast.unparse(node.bases[0]) if node.bases else ""
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    owner[item] = base
    return owner


def test_no_function_takes_more_than_six_parameters_besides_self_and_settings():
    over = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        owner = _function_bases(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if _decorator_names(node) & EXEMPT_DECORATORS or node.name in EXEMPT_FUNCTIONS:
                continue
            if owner.get(node, "").endswith("autograd.Function"):
                continue
            args = node.args
            params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs
                      if a.arg not in ("self", "cls", "settings")]
            if len(params) > MAX_PARAMETERS:
                over.append(f"{name}.{node.name} (line {node.lineno}): {len(params)} parameters")
    assert not over, "functions over the limit:\n" + "\n".join(over)


def _identifiers(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.lineno, node.name
        elif isinstance(node, ast.arg):
            yield node.lineno, node.arg
        elif isinstance(node, ast.alias):
            yield getattr(node, "lineno", 0), node.asname or node.name


def test_the_core_knows_nothing_of_ranks_shards_or_stand_in_chunks():
    """No identifier of ``funcprobe/core`` names a rank, a shard, a process group, FSDP or a
    stand-in/placeholder chunk (its docstrings may say what it does not do)."""
    forbidden = {"rank", "ranks", "world", "shard", "shards", "sharded", "sharding", "placeholder", "placeholders",
                 "fsdp", "fsdp2", "distributed", "dist", "collective", "collectives", "stand", "min", "chunks"}
    allowed = {"min", "chunks"}  # as words alone; forbidden only together as min_chunks
    for path in (PACKAGE / "core").rglob("*.py"):
        for lineno, ident in _identifiers(ast.parse(path.read_text())):
            words = set(ident.lower().strip("_").split("_"))
            bad = (words & forbidden) - allowed
            if "min" in words and "chunks" in words:
                bad.add("min_chunks")
            if "stand" in words and "in" in words:
                bad.add("stand_in")
            bad.discard("stand")
            assert not bad, f"{path.relative_to(PACKAGE)}:{lineno}: identifier {ident!r} names {sorted(bad)}"

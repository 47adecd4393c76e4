"""The package's layers (docs/layout.md): who may import whom, no import cycles, and no function with more than
8 parameters. Read from the source with ``ast``, so imports inside functions count as much as those at the top."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "litevar"

# Lowest first: a unit may import its own layer and the layers below it, never one above. A unit is a subpackage
# (attention, eval, models, quant, train), a top-level module, "cli" (litevar/cli.py and every subpackage's
# commands.py: the subcommands) or "package" (litevar/__init__.py, the public API).
LAYERS = [
    {"files", "version", "registry", "jobs", "data", "flops", "sampling", "distributed", "images", "cli_args"},
    {"attention"},  # processors, kernels, the KV cache and the attention context the models run
    {"models"},
    {"pipeline"},
    {"recipe", "draft_refine"},  # draft_refine: a step that loads a second pipeline
    {"eval", "train", "samples"},
    {"quant", "kvcompress"},  # compression techniques; quant's sensitivity study measures with eval's metrics
    {"cli"},
    {"package"},
]
MAX_PARAMETERS = 8
# Functions over the limit in files that other engineers were rewriting when the limit came in; each is theirs to
# split, and the entry goes once it is (the test fails on an entry that no longer needs it).
TOO_MANY_PARAMETERS = {
    "litevar/eval/bench.py::run_bench": "bench.py belongs to the benchmark rework; only its job list changed here",
    "litevar/attention/dispatch.py::KernelDispatcher.attend": "the attention rework (components, dispatcher) owns it",
    "litevar/attention/kv_compressed.py::CompressedKVCache.__init__": "the KV-compression work owns this new file",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] == "cli" or (len(parts) >= 3 and parts[-1] == "commands"):
        return "cli"
    return parts[1]


def _imports(source: str, module: str, is_package: bool):
    """(line, imported module) for every import in ``module``'s source, at any depth, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if _is_module(sub) else target
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            yield node.lineno, str(node.args[0].value)


def _edges() -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, where) for every import between two different units."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _unit(_module_name(path))
        for line, target in _imports(path.read_text(), _module_name(path), path.name == "__init__.py"):
            if target == "litevar" or target.startswith("litevar."):
                if _unit(target) != source:
                    edges.append((source, _unit(target), f"{path.relative_to(ROOT)}:{line} imports {target}"))
    return edges


def test_every_unit_has_a_layer():
    placed = set().union(*LAYERS)
    units = {_unit(_module_name(path)) for path in PACKAGE.rglob("*.py")}
    assert not units - placed, f"place these in LAYERS (tests/test_layers.py) and docs/layout.md: {units - placed}"
    assert sum(len(layer) for layer in LAYERS) == len(placed), "a unit is in two layers"


def test_no_layer_imports_a_higher_one():
    level = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    upward = [where for source, target, where in _edges() if level.get(target, -1) > level.get(source, -1)]
    assert not upward, "imports of a higher layer (see docs/layout.md):\n" + "\n".join(upward)


def test_no_import_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for source, target, _ in _edges():
        graph.setdefault(source, set()).add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(unit: str) -> None:  # Tarjan's strongly connected components
        index[unit] = low[unit] = len(index)
        stack.append(unit)
        for other in graph.get(unit, ()):
            if other not in index:
                visit(other)
                low[unit] = min(low[unit], low[other])
            elif other in stack:
                low[unit] = min(low[unit], index[other])
        if low[unit] == index[unit]:
            component = []
            while not component or component[-1] != unit:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for unit in sorted(graph):
        if unit not in index:
            visit(unit)
    assert not cycles, f"import cycles between units: {cycles}"


def _functions(path: Path):
    """(qualified name, parameter count without self/cls and without *args/**kwargs) of every def."""
    def walk(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in (*child.args.posonlyargs, *child.args.args, *child.args.kwonlyargs)]
                if prefix and names and names[0] in ("self", "cls"):
                    names = names[1:]
                yield f"{prefix}{child.name}", len(names)
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(ast.parse(path.read_text(), str(path)), "")


def test_no_function_takes_more_than_eight_parameters():
    counts = {f"{path.relative_to(ROOT).as_posix()}::{name}": n
              for folder in ("litevar", "benchmarks") for path in sorted((ROOT / folder).rglob("*.py"))
              for name, n in _functions(path)}
    over = {name: n for name, n in counts.items() if n > MAX_PARAMETERS and name not in TOO_MANY_PARAMETERS}
    assert not over, f"more than {MAX_PARAMETERS} parameters (group them in a config dataclass): {over}"
    settled = [name for name in TOO_MANY_PARAMETERS
               if (ROOT / name.partition("::")[0]).exists() and counts.get(name, 0) <= MAX_PARAMETERS]
    assert not settled, f"remove from TOO_MANY_PARAMETERS, they are within the limit now: {settled}"


def test_the_checks_see_function_level_relative_and_importlib_imports():
    source = ("from .. import jobs\n"
              "def f():\n"
              "    from ..recipe import build_pipeline\n"
              "    from .quality import generate_set\n"
              "    importlib.import_module('litevar.quant.methods')\n")
    found = [target for _, target in _imports(source, "litevar.eval.example", False)]
    assert found == ["litevar.jobs", "litevar.recipe", "litevar.eval.quality", "litevar.quant.methods"]
    assert _unit("litevar.attention.commands") == "cli" and _unit("litevar") == "package"
    assert _unit("litevar.quant.methods.rtn") == "quant" and _unit("litevar.flops") == "flops"

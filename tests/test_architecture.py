"""The code's shape, read with ``ast`` and regular expressions (nothing of hydraserve is imported):
imports go down the layers of the architecture, modules import each other without cycles, modules
and the controller stay small, and the gateway, the simulator and the control plane keep to
typed interfaces. Each check is a function of a source tree, unit-tested on small trees here."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hydraserve"

# Low -> high: a module may import its own package or top-level module, a lower layer, or a peer
# in its layer (except FORBIDDEN_PEERS). "__init__" is the package itself (its version only).
LAYERS = [
    ("__init__", "protocol", "httpjson", "lease"),
    ("config",),
    ("store",),
    ("engine",),
    ("tokenizer",),
    ("make_model", "gguf_import", "gguf_tokenizer", "testbeds"),
    ("worker", "cluster"),
    ("control",),
    ("gateway", "workload"),
    ("sim",),
    ("cli", "__main__"),
]
FORBIDDEN_PEERS = {("worker", "cluster"), ("cluster", "worker")}
LAYER = {unit: level for level, units in enumerate(LAYERS) for unit in units}

CONTROL_MODULE_LINES = 250
CONTROLLER_CLASS_LINES = 200
MODULE_LINES = 450

# Reaching into the controller's state instead of its methods; reading untyped worker messages.
CONTROLLER_INTERNALS = r"controller\.(endpoints|instances|_)"
UNTYPED_MESSAGES = r'\["stage_port"\]|get\("standalone"\)|"weights_ready" in'


# -- reading a source tree ------------------------------------------------------------------------

def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under ``package`` (named after its folder)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportFinder(ast.NodeVisitor):
    """Import statements, in order; those under ``if TYPE_CHECKING:`` are skipped (they never
    run), and with ``module_level`` so are those inside functions (they run when called)."""

    def __init__(self, module_level: bool):
        self.module_level = module_level
        self.found: list[ast.Import | ast.ImportFrom] = []

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        self.found.append(node)

    visit_ImportFrom = visit_Import

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if not self.module_level:
            self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef


def imports(name: str, path: Path, known: dict[str, Path],
            module_level: bool = False) -> list[tuple[int, str]]:
    """(line, module) for each import of a module in ``known`` by the module ``name``.
    ``from a import b`` is an import of ``a.b`` where that is a module, else of ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    finder = _ImportFinder(module_level)
    finder.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    out = []
    for node in finder.found:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        out += [(node.lineno, t) for t in dict.fromkeys(targets) if t in known]
    return out


def unit(module: str) -> str:
    """The package of hydraserve/ or the top-level module that ``module`` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


# -- the checks -----------------------------------------------------------------------------------

def layer_violations(package: Path) -> list[str]:
    """Every import that goes up a layer or to a forbidden peer, and every module in no layer."""
    known = modules(package)
    bad = sorted({f"{m}: {unit(m)} is in no layer" for m in known if unit(m) not in LAYER})
    for name, path in known.items():
        src = unit(name)
        for line, target in imports(name, path, known):
            dst = unit(target)
            if src == dst or src not in LAYER or dst not in LAYER:
                continue
            if LAYER[dst] > LAYER[src] or (src, dst) in FORBIDDEN_PEERS:
                bad.append(f"{name}:{line} imports {target} "
                           f"({src}, layer {LAYER[src]} -> {dst}, layer {LAYER[dst]})")
    return bad


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (node -> successors)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_cycles(package: Path) -> list[list[str]]:
    """The groups of modules that import each other in a cycle at import time (module-level
    imports only: one inside a function runs later, when the modules are loaded)."""
    known = modules(package)
    graph = {name: {t for _, t in imports(name, path, known, module_level=True) if t != name}
             for name, path in known.items()}
    return [c for c in strongly_connected(graph) if len(c) > 1]


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def oversized(root: Path, folder: str, limit: int) -> list[str]:
    """``path: N lines`` for each module under ``root / folder`` longer than ``limit`` lines."""
    paths = sorted((root / folder).rglob("*.py"))
    return [f"{p.relative_to(root)}: {line_count(p)} lines" for p in paths if line_count(p) > limit]


def class_lines(path: Path, name: str) -> int | None:
    """Lines of the top-level class ``name`` in ``path`` (None if there is none)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    return None if node is None else node.end_lineno - node.lineno + 1


def pattern_hits(root: Path, folders: list[str], pattern: str) -> list[str]:
    """``path:line: text`` for each line of a file under ``root / folder`` (for each of
    ``folders``) that matches ``pattern``."""
    regex = re.compile(pattern)
    hits = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            text = path.read_text(encoding="utf-8", errors="ignore")
            hits += [f"{path.relative_to(root)}:{i}: {line.strip()}"
                     for i, line in enumerate(text.splitlines(), 1) if regex.search(line)]
    return hits


# -- on this repository ---------------------------------------------------------------------------

def test_imports_go_down_the_layers():
    bad = layer_violations(PACKAGE)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles_at_module_level():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "modules that import each other in a cycle:\n" + \
        "\n".join(" <-> ".join(c) for c in cycles)


def test_control_modules_are_small():
    bad = oversized(ROOT, "hydraserve/control", CONTROL_MODULE_LINES)
    assert not bad, f"control/ modules over {CONTROL_MODULE_LINES} lines:\n" + "\n".join(bad)


def test_the_controller_class_is_small():
    n = class_lines(PACKAGE / "control" / "controller.py", "Controller")
    assert n is not None, "control/controller.py defines no class Controller"
    assert n <= CONTROLLER_CLASS_LINES, \
        f"class Controller is {n} lines (at most {CONTROLLER_CLASS_LINES})"


def test_modules_are_small():
    bad = oversized(ROOT, "hydraserve", MODULE_LINES)
    assert not bad, f"modules over {MODULE_LINES} lines:\n" + "\n".join(bad)


def test_gateway_and_simulator_use_the_controllers_interface():
    hits = pattern_hits(ROOT, ["hydraserve/gateway", "hydraserve/sim"], CONTROLLER_INTERNALS)
    assert not hits, "the controller's internals reached into:\n" + "\n".join(hits)


def test_control_plane_reads_typed_messages():
    hits = pattern_hits(ROOT, ["hydraserve/control", "ae_scripts"], UNTYPED_MESSAGES)
    assert not hits, "untyped worker messages read:\n" + "\n".join(hits)


# -- the checks catch what they should, on small trees --------------------------------------------

def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "hydraserve"


def test_layer_check_finds_upward_and_peer_imports(tmp_path):
    package = _tree(tmp_path, {
        "hydraserve/__init__.py": "",
        "hydraserve/config.py": "from hydraserve import protocol\n",
        "hydraserve/protocol.py": "",
        "hydraserve/engine/__init__.py": "",
        "hydraserve/engine/ok.py": "from hydraserve.engine import up\nfrom . import up as again\n",
        "hydraserve/engine/up.py": (
            "from typing import TYPE_CHECKING\n"
            "import hydraserve.config\n"
            "if TYPE_CHECKING:\n    from hydraserve.gateway import app\n"
            "def late():\n    from hydraserve.gateway.app import App\n"
            "    from ..control import fleet\n"),
        "hydraserve/gateway/__init__.py": "",
        "hydraserve/gateway/app.py": "",
        "hydraserve/control/__init__.py": "",
        "hydraserve/control/fleet.py": "",
        "hydraserve/worker/__init__.py": "import hydraserve.cluster.local\n",
        "hydraserve/cluster/__init__.py": "",
        "hydraserve/cluster/local.py": "",
        "hydraserve/newthing.py": "",
    })
    assert layer_violations(package) == [
        "hydraserve.newthing: newthing is in no layer",
        "hydraserve.engine.up:6 imports hydraserve.gateway.app "
        "(engine, layer 3 -> gateway, layer 8)",
        "hydraserve.engine.up:7 imports hydraserve.control.fleet "
        "(engine, layer 3 -> control, layer 7)",
        "hydraserve.worker:1 imports hydraserve.cluster.local "
        "(worker, layer 6 -> cluster, layer 6)",
    ]


def test_cycle_check_counts_only_imports_that_run_at_import_time(tmp_path):
    package = _tree(tmp_path, {
        "hydraserve/__init__.py": "",
        "hydraserve/a.py": "import hydraserve.b\n",
        "hydraserve/b.py": "from hydraserve import c\n",
        "hydraserve/c.py": "try:\n    from hydraserve.a import x\nexcept ImportError:\n    pass\n",
        "hydraserve/d.py": "import hydraserve.e\n",
        "hydraserve/e.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                            "    import hydraserve.d\ndef f():\n    import hydraserve.d\n"),
    })
    assert import_cycles(package) == [["hydraserve.a", "hydraserve.b", "hydraserve.c"]]
    assert strongly_connected({"x": {"y"}, "y": {"x", "z"}, "z": {"z"}}) == [["z"], ["x", "y"]]


def test_size_and_pattern_checks_find_what_they_look_for(tmp_path):
    package = _tree(tmp_path, {
        "hydraserve/control/controller.py": "class Controller:\n" + "    x = 1\n" * 200,
        "hydraserve/small.py": "x = 1\n",
        "hydraserve/gateway/app.py": "n = len(gateway.controller.instances)\n"
                                     "m = gateway.controller.describe()\n",
        "ae_scripts/run.py": 'port = msg["stage_port"]\nok = "weights_ready" in msg\n',
    })
    assert class_lines(package / "control" / "controller.py", "Controller") == 201
    assert class_lines(package / "small.py", "Controller") is None
    assert oversized(tmp_path, "hydraserve", 200) == ["hydraserve/control/controller.py: 201 lines"]
    assert oversized(tmp_path, "hydraserve/gateway", 1) == ["hydraserve/gateway/app.py: 2 lines"]
    assert pattern_hits(tmp_path, ["hydraserve/gateway"], CONTROLLER_INTERNALS) == [
        "hydraserve/gateway/app.py:1: n = len(gateway.controller.instances)"]
    assert pattern_hits(tmp_path, ["ae_scripts"], UNTYPED_MESSAGES) == [
        'ae_scripts/run.py:1: port = msg["stage_port"]',
        'ae_scripts/run.py:2: ok = "weights_ready" in msg']


@pytest.mark.parametrize("source, pattern", [
    ("self.controller._queue", CONTROLLER_INTERNALS),
    ("for ep in controller.endpoints.values():", CONTROLLER_INTERNALS),
    ('if reply.get("standalone"):', UNTYPED_MESSAGES),
])
def test_patterns_match_the_shapes_they_forbid(source, pattern):
    assert re.search(pattern, source)

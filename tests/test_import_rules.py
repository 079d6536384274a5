"""The package's import rules, checked by AST over every module under ``src/deepfleet``.

Every import counts, at any depth (inside functions too), and so do dynamic imports
(``__import__(...)``, ``importlib.import_module(...)``, the agent's ``_import_backend(...)``):

1. ``deepfleet.compressors`` and ``deepfleet.search`` never import ``deepfleet.orchestrator``,
   ``deepfleet.sandbox``, ``ray`` or ``paramiko`` (DESIGN §3: they know nothing of Ray or SSH).
2. The device program and its libraries (``bundle.AGENT_MODULES``: the one file shipped to
   devices is built from them) import only the standard library, numpy and the libraries; the
   one dynamic import is the agent's optional runtimes: ``backends._import_backend`` with
   "onnxruntime" or "torch".
3. Host code never imports the device program: outside those modules, ``deepfleet.device_agent``
   is used only through its host-facing modules (:data:`HOST_FACING`); ``orchestrator/device.py``
   gets the shipped file from ``bundle``.

Tests may import anything (``tests/device_agent`` imports ``agent.py`` directly).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from deepfleet.device_agent import bundle

SRC = Path(__file__).resolve().parents[1] / "src"
AGENT = "deepfleet.device_agent"
AGENT_MODULES = {f"{AGENT}.{name}" for name in bundle.AGENT_MODULES}
LIBRARIES = {f"{AGENT}.{name}" for name in bundle.LIBRARIES}
HOST_FACING = {f"{AGENT}.{name}" for name in ("format", "runtime", "protocol", "bundle", "powersim")}
# imported on request only, by _import_backend (LiteRT: whichever interpreter is installed)
OPTIONAL_RUNTIMES = {"onnxruntime", "torch", "ai_edge_litert.interpreter", "tflite_runtime.interpreter"}
NO_RAY_OR_SSH = ("deepfleet.orchestrator", "deepfleet.sandbox", "ray", "paramiko")

RULE_1 = ("deepfleet.compressors and deepfleet.search never import deepfleet.orchestrator, "
          "deepfleet.sandbox, ray or paramiko (DESIGN §3)")
RULE_2 = ("the device program and its libraries import only the standard library, numpy and the "
          "libraries built into the shipped file (bundle.LIBRARIES); optional runtimes only via "
          "backends._import_backend('onnxruntime' | 'torch' | a LiteRT interpreter)")
RULE_3 = ("host code never imports the device program: use deepfleet.device_agent.format, "
          ".runtime, .protocol (or .bundle for the shipped file)")


@dataclass(frozen=True)
class Use:
    """One import in one module."""

    module: str
    line: int
    target: str  # the dotted module imported ("<dynamic>" when not a constant)
    how: str  # the statement, as written
    function: str | None  # the enclosing function, None at module level
    dynamic: bool


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.module, self.is_package, self.known = module, is_package, known
        self.functions: list[str] = []
        self.uses: list[Use] = []

    def _add(self, node: ast.AST, target: str, dynamic: bool = False) -> None:
        self.uses.append(Use(self.module, getattr(node, "lineno", 0), target, ast.unparse(node),
                             self.functions[-1] if self.functions else None, dynamic))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            package = self.module.split(".")
            if not self.is_package:
                package = package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(node, sub if sub in self.known else base)  # `from pkg import module`

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if name in ("__import__", "import_module", "_import_backend"):
            arg = node.args[0] if node.args else None
            target = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) \
                else "<dynamic>"
            self._add(node, target, dynamic=True)
        self.generic_visit(node)


def collect(sources: dict[str, tuple[str, bool]]) -> list[Use]:
    """Every import of every module: ``sources`` maps a module name to (source, is_package)."""
    known = set(sources)
    uses = []
    for module, (text, is_package) in sorted(sources.items()):
        collector = _Collector(module, is_package, known)
        collector.visit(ast.parse(text))
        uses += collector.uses
    return uses


def violations(uses: list[Use]) -> list[str]:
    """One line per broken rule: the module and line, the import, and the rule."""
    out = []

    def bad(use: Use, rule: str) -> None:
        out.append(f"{use.module}:{use.line} imports {use.target} (`{use.how}`): {rule}")

    for use in uses:
        if _within(use.module, "deepfleet.compressors") or _within(use.module, "deepfleet.search"):
            if any(_within(use.target, p) for p in NO_RAY_OR_SSH):
                bad(use, RULE_1)
        if use.module in AGENT_MODULES:
            if use.dynamic:
                if use.target == "<dynamic>":
                    ok = (use.module == f"{AGENT}.backends" and use.function == "_import_backend"
                          and use.how.startswith("__import__("))
                else:
                    ok = (use.module == f"{AGENT}.backends" and use.how.startswith("_import_backend(")
                          and use.target in OPTIONAL_RUNTIMES)
            else:
                top = use.target.split(".")[0]
                ok = top in sys.stdlib_module_names or top == "numpy" or use.target in LIBRARIES
            if not ok:
                bad(use, RULE_2)
        elif _within(use.target, AGENT) and use.target != AGENT and use.target not in HOST_FACING:
            bad(use, RULE_3)
    return out


def _package_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for path in sorted((SRC / "deepfleet").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        sources[".".join(parts)] = (path.read_text(encoding="utf-8"), is_package)
    return sources


def test_the_package_keeps_its_import_rules() -> None:
    sources = _package_sources()
    assert AGENT_MODULES | HOST_FACING <= set(sources)  # the rules name real modules
    uses = collect(sources)
    assert len(uses) > 200  # the walk found the package's imports
    broken = violations(uses)
    assert broken == [], "import rules broken:\n" + "\n".join(broken)


def test_the_optional_runtimes_are_the_agents_only_dynamic_imports() -> None:
    uses = [u for u in collect(_package_sources()) if u.module in AGENT_MODULES and u.dynamic]
    assert {u.target for u in uses} == OPTIONAL_RUNTIMES | {"<dynamic>"}


@pytest.mark.parametrize(("module", "text", "expected"), [
    ("deepfleet.compressors._x", "def f():\n    import ray\n",
     "deepfleet.compressors._x:2 imports ray (`import ray`): deepfleet.compressors and"),
    ("deepfleet.search.x", "from ..orchestrator import fleet\n",
     "deepfleet.search.x:1 imports deepfleet.orchestrator.fleet"),
    ("deepfleet.orchestrator.y", "from deepfleet.device_agent import agent\n",
     "deepfleet.orchestrator.y:1 imports deepfleet.device_agent.agent (`from deepfleet.device_agent "
     "import agent`): host code never imports the device program"),
    ("deepfleet.report.z", "def f():\n    from deepfleet.device_agent.energy import MULT_PJ\n",
     "deepfleet.report.z:2 imports deepfleet.device_agent.energy"),
    ("deepfleet.device_agent.format", "import pandas\n",
     "deepfleet.device_agent.format:1 imports pandas (`import pandas`): the device program"),
    ("deepfleet.device_agent.agent", "from deepfleet.errors import DeviceError\n",
     "deepfleet.device_agent.agent:1 imports deepfleet.errors"),
    ("deepfleet.device_agent.backends", "def f():\n    return __import__('scipy')\n",
     "deepfleet.device_agent.backends:2 imports scipy (`__import__('scipy')`): the device"),
    ("deepfleet.device_agent.energy", "def f(m):\n    return importlib.import_module(m)\n",
     "deepfleet.device_agent.energy:2 imports <dynamic>"),
    ("deepfleet.device_agent.backends", "x = _import_backend('tensorflow')\n",
     "deepfleet.device_agent.backends:1 imports tensorflow"),
])
def test_each_rule_names_the_module_the_import_and_the_rule(module: str, text: str,
                                                             expected: str) -> None:
    # the modules that `from pkg import module` may name, then the module under test
    sources = {"deepfleet.orchestrator.fleet": ("", False), f"{AGENT}.agent": ("", False)}
    sources[module] = (text, False)
    broken = violations(collect(sources))
    assert len(broken) == 1 and broken[0].startswith(expected), broken


def test_allowed_imports_are_not_reported() -> None:
    sources = {
        "deepfleet.device_agent.backends": ("import os\nimport numpy as np\n"
                                            "from deepfleet.device_agent.format import file_digest\n"
                                            "def _import_backend(module):\n"
                                            "    return __import__(module)\n"
                                            "t = _import_backend('torch')\n", False),
        "deepfleet.orchestrator.device": ("from deepfleet.device_agent import bundle\n"
                                          "from deepfleet.device_agent.format import ARTIFACT_FILES\n",
                                          False),
        "deepfleet.device_agent.bundle": ("", False),
        "deepfleet.compressors._y": ("import torch\nfrom deepfleet.device_agent.format import "
                                     "decode_tensor\n", False),
    }
    assert violations(collect(sources)) == []

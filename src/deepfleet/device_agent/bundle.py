"""Build the ONE file shipped to devices from the device program and its libraries.

The device program is ``agent.py``. It imports its libraries (:data:`LIBRARIES`: the artifact
format, its numpy runtime, the request schema, and the program's own parts) like any package
module, so that tests can import it. A device gets one self-contained script instead:
:func:`agent_source` copies ``agent.py`` and replaces each ``from deepfleet.device_agent.X
import ...`` statement by the source of ``X`` (built the same way; each library once, before its
first use). Everything then shares one namespace, so the build refuses, with the module and line:

* two modules that bind the same top-level name differently (imports of the same thing are fine);
* an ``import deepfleet...``, an aliased, starred, relative or nested import of a library, or a
  name imported that the library does not define;
* a library outside :data:`LIBRARIES`, an import cycle, ``from __future__``, or a result that
  is not Python 3.8 syntax.

The build is deterministic: the same sources give the same bytes (a header comment lists each
source's sha256; nothing depends on paths, clocks or the environment). :func:`agent_file` writes
it once to ``$DEEPFLEET_CACHE/agent/<sha256>/agent.py`` (or under a given directory), which
``orchestrator/device.py`` uploads. :func:`agent_version` reads ``AGENT_VERSION`` from the
source: host code never imports the device program.

Host code, standard library only (this module is not shipped).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import tempfile
from pathlib import Path

from deepfleet._files import cache_dir
from deepfleet.errors import DeepfleetError

__all__ = [
    "AGENT_MODULES",
    "LIBRARIES",
    "PROGRAM",
    "BundleError",
    "agent_file",
    "agent_sha256",
    "agent_source",
    "agent_version",
]

PACKAGE = "deepfleet.device_agent"
SOURCES = Path(__file__).resolve().parent
PROGRAM = "agent"
#: The libraries the program may import, inlined into the shipped file (in this order when the
#: program imports them in this order; a library's own imports come first).
LIBRARIES = ("format", "runtime", "protocol", "system", "backends", "energy")
#: Every module the shipped file is built from.
AGENT_MODULES = (PROGRAM, *LIBRARIES)
_FEATURE_VERSION = (3, 8)  # the oldest Python on the fleet (Intel Edison images)


class BundleError(DeepfleetError):
    """The device modules cannot be built into one file (names the module, line and fix)."""


# ---------------------------------------------------------------------------- analysis


def _is_ours(module: str) -> bool:
    return module == "deepfleet" or module.startswith("deepfleet.")


def _library_imports(name: str, tree: ast.Module) -> list[tuple[ast.ImportFrom, str]]:
    """The ``from deepfleet.device_agent.X import ...`` statements of module ``name``, checked:
    each at top level, of a library, without aliases or a star."""
    found = []
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        where = f"{name}.py line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_ours(alias.name):
                    raise BundleError(f"{where}: `import {alias.name}` cannot be inlined; write "
                                      f"`from {PACKAGE}.<library> import name, ...`")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                raise BundleError(f"{where}: relative import `from {'.' * node.level}{module} "
                                  f"import ...`; write `from {PACKAGE}.<library> import ...`")
            if module == "__future__":
                raise BundleError(f"{where}: `from __future__` cannot stand in the middle of the "
                                  "shipped file; remove it (the device modules use 3.8 syntax)")
            if not _is_ours(module):
                continue
            library = module[len(PACKAGE) + 1:] if module.startswith(PACKAGE + ".") else ""
            if library not in LIBRARIES:
                raise BundleError(f"{where}: imports {module}, which is not one of the libraries "
                                  f"built into the shipped file ({', '.join(LIBRARIES)}); the "
                                  "device has only the standard library and numpy")
            if id(node) not in top:
                raise BundleError(f"{where}: the import of {module} is not at module level; move "
                                  "it to the top of the module so that it can be inlined")
            bad = [a.name + (f" as {a.asname}" if a.asname else "") for a in node.names
                   if a.asname or a.name == "*"]
            if bad:
                raise BundleError(f"{where}: `{', '.join(bad)}` from {module}: the shipped file "
                                  "has one namespace; import names as they are, without aliases")
            found.append((node, library))
    return found


def _bindings(tree: ast.Module) -> dict[str, str]:
    """Top-level names a module binds -> what binds them ("def" or the import that does).

    Imports of a library are left out (they bind the library's own names).
    """
    out: dict[str, str] = {}

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out[node.name] = "def"
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for n in ast.walk(target):
                        if isinstance(n, ast.Name):
                            out[n.id] = "def"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        out[a.asname] = f"import {a.name} as {a.asname}"
                    else:  # `import importlib.util` binds `importlib`
                        top = a.name.split(".")[0]
                        out[top] = f"import {top}"
            elif isinstance(node, ast.ImportFrom) and not _is_ours(node.module or ""):
                for a in node.names:
                    out[a.asname or a.name] = f"from {node.module} import {a.name}"
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for part in ("body", "orelse", "finalbody"):
                    visit(getattr(node, part, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return out


def _check_namespace(trees: dict[str, ast.Module]) -> None:
    """Refuse names that two modules bind differently, and imports of undefined names."""
    bindings = {name: _bindings(tree) for name, tree in trees.items()}
    owner: dict[str, tuple[str, str]] = {}
    for module in AGENT_MODULES:
        for name, how in bindings[module].items():
            if name in owner and (owner[name][1] != how or how == "def"):
                other = owner[name][0]
                raise BundleError(f"{module}.py and {other}.py both define the top-level name "
                                  f"{name!r} ({how}; {owner[name][1]}); in the one shipped file "
                                  "they share a namespace: rename one of them")
            owner.setdefault(name, (module, how))
    for module, tree in trees.items():
        for node, library in _library_imports(module, tree):
            for alias in node.names:
                if alias.name not in bindings[library]:
                    raise BundleError(f"{module}.py line {node.lineno}: {library}.py defines no "
                                      f"top-level name {alias.name!r}")


# ---------------------------------------------------------------------------- build


def _build(texts: tuple[tuple[str, str], ...]) -> bytes:
    """The shipped file from ((module, source text), ...) in :data:`AGENT_MODULES` order."""
    sources = dict(texts)
    trees = {}
    for name, text in sources.items():
        try:
            trees[name] = ast.parse(text, f"{name}.py", feature_version=_FEATURE_VERSION)
        except SyntaxError as exc:
            raise BundleError(f"{name}.py line {exc.lineno}: not Python 3.8 syntax ({exc.msg}); "
                              "the device modules must run on Python >= 3.8") from None
    imports = {name: _library_imports(name, tree) for name, tree in trees.items()}
    _check_namespace(trees)

    out: list[str] = []
    done: set[str] = set()

    def emit(name: str, stack: tuple[str, ...]) -> None:
        lines = sources[name].splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        replace = {node.lineno - 1: (node.end_lineno or node.lineno, lib)
                   for node, lib in imports[name]}
        i = 0
        while i < len(lines):
            if i not in replace:
                out.append(lines[i])
                i += 1
                continue
            end, lib = replace[i]
            if len(ast.parse("".join(lines[i:end])).body) != 1:
                raise BundleError(f"{name}.py line {i + 1}: the import of {lib} shares its lines "
                                  "with another statement; give it lines of its own")
            if lib in stack:
                raise BundleError(f"import cycle: {' -> '.join((*stack, lib))}; the libraries "
                                  "must import each other in one direction")
            if lib in done:
                out.append(f"# ({PACKAGE}.{lib}: inlined above)\n")
            else:
                done.add(lib)
                out.append(f"# {'=' * 30} inlined: {PACKAGE}.{lib} ({lib}.py)\n")
                emit(lib, (*stack, lib))
                out.append(f"# {'=' * 30} end of {lib}.py\n")
            i = end

    emit(PROGRAM, (PROGRAM,))
    header = ["# Built by deepfleet.device_agent.bundle from these sources (sha256); do not edit:\n",
              *(f"#   {name}.py {hashlib.sha256(sources[name].encode()).hexdigest()}\n"
                for name in AGENT_MODULES)]
    cut = 1 if out and out[0].startswith("#!") else 0  # the shebang stays the first line
    text = "".join(out[:cut] + header + out[cut:])
    try:
        ast.parse(text, "agent.py", feature_version=_FEATURE_VERSION)
    except SyntaxError as exc:  # e.g. a library without a final newline inside a bracket
        raise BundleError(f"the built agent does not parse at line {exc.lineno}: {exc.msg}") from None
    return text.encode("utf-8")


@functools.lru_cache(maxsize=8)
def _build_cached(texts: tuple[tuple[str, str], ...]) -> bytes:
    return _build(texts)


def agent_source(*, sources: str | os.PathLike[str] | None = None) -> bytes:
    """The bytes of the one file shipped to devices, built from the modules in ``sources``
    (default: this package's directory). Same sources, same bytes. Raises BundleError (see the
    module docstring) and OSError when a source cannot be read."""
    root = Path(sources) if sources is not None else SOURCES
    texts = tuple((name, (root / f"{name}.py").read_text(encoding="utf-8"))
                  for name in AGENT_MODULES)
    return _build_cached(texts)


def agent_sha256() -> str:
    """The sha256 of :func:`agent_source`: the hash a device's ``hello`` reports."""
    return hashlib.sha256(agent_source()).hexdigest()


def agent_file(directory: str | os.PathLike[str] | None = None) -> Path:
    """The built agent as a file, ``<directory>/<sha256>/agent.py`` (default directory:
    ``$DEEPFLEET_CACHE/agent``). Written atomically when absent or not matching its name."""
    data = agent_source()
    digest = hashlib.sha256(data).hexdigest()
    folder = (Path(directory) if directory is not None else cache_dir() / "agent") / digest
    path = folder / "agent.py"
    try:
        if hashlib.sha256(path.read_bytes()).hexdigest() == digest:
            return path
    except OSError:
        pass  # not built yet
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".agent.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def agent_version(*, sources: str | os.PathLike[str] | None = None) -> str:
    """``AGENT_VERSION`` of the device program, read from its source (never imported)."""
    path = (Path(sources) if sources is not None else SOURCES) / f"{PROGRAM}.py"
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "AGENT_VERSION"
                                                 for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    raise BundleError(f"{path} has no `AGENT_VERSION = \"...\"` at module level; add it back")

"""bundle.py: the one shipped file is built deterministically, and refuses what cannot be inlined."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deepfleet.device_agent import agent, bundle
from deepfleet.device_agent.bundle import BundleError


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """A private copy of the agent's source files, to edit."""
    out = tmp_path / "src"
    out.mkdir()
    for name in bundle.AGENT_MODULES:
        shutil.copy(bundle.SOURCES / f"{name}.py", out / f"{name}.py")
    return out


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_same_sources_give_the_same_bytes(sources: Path) -> None:
    first = bundle.agent_source()
    bundle._build_cached.cache_clear()  # build again for real, not from the cache
    assert bundle.agent_source() == first
    assert bundle.agent_source(sources=sources) == first  # the path does not matter either
    header = first.decode().splitlines()[1:1 + 1 + len(bundle.AGENT_MODULES)]
    for name in bundle.AGENT_MODULES:
        digest = hashlib.sha256((sources / f"{name}.py").read_bytes()).hexdigest()
        assert f"#   {name}.py {digest}" in header


def test_a_changed_library_changes_the_file_and_its_header(sources: Path) -> None:
    _append(sources / "format.py", "\n# a comment is a change too\n")
    changed = bundle.agent_source(sources=sources)
    assert changed != bundle.agent_source()
    digest = hashlib.sha256((sources / "format.py").read_bytes()).hexdigest()
    assert f"#   format.py {digest}".encode() in changed


def test_each_library_is_inlined_once_before_its_first_use() -> None:
    text = bundle.agent_source().decode()
    for lib in bundle.LIBRARIES:
        assert text.count(f"inlined: deepfleet.device_agent.{lib} ") == 1, lib
    # format defines what runtime imports from it: it must come first
    assert text.index("inlined: deepfleet.device_agent.format") < text.index("def load_model(")


def test_agent_file_is_named_by_its_hash_and_repaired_if_damaged(tmp_path: Path) -> None:
    path = bundle.agent_file(tmp_path)
    data = path.read_bytes()
    assert path.name == "agent.py" and path.parent.name == hashlib.sha256(data).hexdigest()
    assert data == bundle.agent_source() and path.stat().st_mode & 0o111
    path.write_bytes(b"damaged")
    assert bundle.agent_file(tmp_path) == path and path.read_bytes() == data


def test_agent_version_is_read_from_the_source_without_importing_it(sources: Path) -> None:
    assert bundle.agent_version() == agent.AGENT_VERSION
    text = (sources / "agent.py").read_text().replace("AGENT_VERSION = ", "VERSION = ")
    (sources / "agent.py").write_text(text)
    with pytest.raises(BundleError, match="no `AGENT_VERSION"):
        bundle.agent_version(sources=sources)


@pytest.mark.parametrize(("module", "text", "message"), [
    ("format.py", "\ndef log(message):\n    pass\n",
     r"format.py and agent.py both define the top-level name 'log'"),
    ("energy.py", "\ndef late():\n    from deepfleet.device_agent.format import file_digest\n",
     r"energy.py line \d+: the import of deepfleet.device_agent.format is not at module level"),
    ("protocol.py", "\nfrom deepfleet.errors import ConfigError\n",
     r"protocol.py line \d+: imports deepfleet.errors, which is not one of the libraries"),
    ("system.py", "\nfrom deepfleet.device_agent.protocol import finite as fin\n",
     r"system.py line \d+: `finite as fin`.*without aliases"),
    ("system.py", "\nfrom deepfleet.device_agent.protocol import nothing_like_this\n",
     r"protocol.py defines no top-level name 'nothing_like_this'"),
    ("backends.py", "\nimport deepfleet.device_agent.format\n",
     r"backends.py line \d+: `import deepfleet.device_agent.format` cannot be inlined"),
    ("format.py", "\nfrom deepfleet.device_agent.runtime import Model\n",
     r"import cycle: .*format -> runtime -> format"),
    ("runtime.py", "\ndef f(:\n", r"runtime.py line \d+: not Python 3.8 syntax"),
    ("agent.py", "\nmatch 1:\n    case 1:\n        pass\n", r"agent.py line \d+: not Python 3.8 syntax"),
])
def test_what_cannot_be_inlined_is_refused_with_module_and_line(sources: Path, module: str, text: str,
                                                                message: str) -> None:
    _append(sources / module, text)
    with pytest.raises(BundleError, match=message):
        bundle.agent_source(sources=sources)


def test_imports_of_the_same_stdlib_name_in_several_modules_are_fine(sources: Path) -> None:
    _append(sources / "format.py", "\nimport json\n")
    _append(sources / "energy.py", "\nimport json\n")
    bundle.agent_source(sources=sources)  # no error: both bind the same module
    _append(sources / "system.py", "\nimport pickle as json\n")
    with pytest.raises(BundleError, match="'json'"):
        bundle.agent_source(sources=sources)


def test_the_built_file_runs_without_the_package(tmp_path: Path) -> None:
    # A copy outside any source tree, in isolated mode: what an SFTP upload gives a device.
    copy = tmp_path / "agent.py"
    copy.write_bytes(bundle.agent_source())
    out = subprocess.run([sys.executable, "-I", str(copy), "--version"], capture_output=True,
                         text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip() == agent.AGENT_VERSION

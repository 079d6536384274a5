"""onnxruntime for the sandbox devices whose CPU has a wheel of it, fetched from PyPI and cached.

Which devices can have it (checked against PyPI and Debian 12, see the README's sandbox table):

* ``x86_64`` and ``aarch64``: PyPI has manylinux CPython wheels. The x86 devices run a venv over
  Debian's python3 (system site packages: Debian's numpy) with the wheel unpacked into it
  (:func:`x86_python`); the arm64 root gets the aarch64 wheel unpacked into its
  ``/usr/local/lib/python3.X/dist-packages`` when it is built (``_roots``). Neither touches this
  machine's own Python.
* ``i686`` (the Edison stand-in) and ``armv7l`` (armhf): PyPI has no wheel for them (nor an
  sdist) and Debian 12 packages no onnxruntime at all, so those devices run numpy only and
  ``backend: auto`` falls back to numpy there (:data:`NO_WHEEL` says why).

Wheels are kept in ``$DEEPFLEET_CACHE/wheels`` and the x86 venv in ``$DEEPFLEET_CACHE/runtimes``,
so only the first ``up`` downloads anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from deepfleet import _files
from deepfleet.errors import DeviceError
from deepfleet.sandbox._proc import sh

__all__ = ["NO_WHEEL", "ONNXRUNTIME", "Interpreter", "has_wheel", "site_packages", "unpack_wheel",
           "wheel", "x86_interpreter", "x86_python"]

#: The onnxruntime every sandbox device that can have one gets. 1.32.0 is the host's (what
#: model.onnx is checked with); its wheels declare numpy>=1.21.6 and were checked to import and
#: infer with Debian 12's numpy 1.24.2, natively on x86_64 and under qemu on aarch64.
ONNXRUNTIME = "1.32.0"
#: ``platform.machine()`` -> pip ``--platform`` tags. pip does not widen a ``manylinux_X_Y`` tag
#: to older ones, so every tag a wheel of this release may carry is listed (1.32: 2_28).
_PLATFORMS = {
    machine: tuple(f"manylinux_{v}_{machine}" for v in ("2_28", "2_27", "2_17"))
    + (f"manylinux2014_{machine}",)
    for machine in ("x86_64", "aarch64")
}
#: Why a device of another CPU runs numpy only (its rows and README say so).
NO_WHEEL = ("onnxruntime has no wheel for {machine} on PyPI (nor an sdist to build) and Debian "
            "12 packages none: this device runs numpy only")
#: Debian's interpreter, which x86 devices run (as the roots' devices run theirs).
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True, kw_only=True)
class Interpreter:
    """The Python a device runs the agent with: ``onnxruntime`` is the version it can import
    (None: numpy only, and ``note`` says why)."""

    python: str
    onnxruntime: str | None
    note: str | None = None


def has_wheel(machine: str) -> bool:
    """Whether PyPI has onnxruntime wheels for ``machine`` (``platform.machine()``)."""
    return machine in _PLATFORMS


def wheel(machine: str, python: str) -> Path:
    """The onnxruntime :data:`ONNXRUNTIME` wheel for CPython ``python`` (``"3.11"``) on
    ``machine``, downloaded by ``pip download`` once into ``$DEEPFLEET_CACHE/wheels``.

    Raises :class:`DeviceError` when there is none or it cannot be fetched, naming the command.
    """
    if not has_wheel(machine):
        raise DeviceError("sandbox: " + NO_WHEEL.format(machine=machine))
    tag = "cp" + python.replace(".", "")
    out_dir = _files.cache_dir() / "wheels"
    found = sorted(out_dir.glob(f"onnxruntime-{ONNXRUNTIME}-{tag}-{tag}-*_{machine}.whl"))
    if found:
        return found[-1]
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--only-binary=:all:", "--implementation", "cp", "--python-version",
            python, *[a for p in _PLATFORMS[machine] for a in ("--platform", p)],
            f"onnxruntime=={ONNXRUNTIME}"]
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".download-") as tmp:
        try:
            sh([*argv, "--dest", tmp], timeout=900)
        except DeviceError as exc:
            raise DeviceError(f"sandbox: cannot fetch the onnxruntime {ONNXRUNTIME} wheel for "
                              f"{machine} (CPython {python}) from PyPI: {exc}") from None
        (got,) = Path(tmp).glob("*.whl")
        os.replace(got, out_dir / got.name)  # atomic: never a half-downloaded wheel in the cache
    return out_dir / got.name


def unpack_wheel(whl: Path, site: Path) -> None:
    """Install a pure-layout wheel (only importable files and its dist-info, like onnxruntime's)
    into the site-packages directory ``site`` by unpacking it: no pip needed where it runs."""
    with zipfile.ZipFile(whl) as z:
        odd = [n for n in z.namelist() if n.split("/", 1)[0].endswith(".data")]
        if odd:
            raise DeviceError(f"sandbox: wheel {whl.name} has files to install outside "
                              f"site-packages ({odd[0]}); it needs pip")
        z.extractall(site)
    dist_info = next(site.glob("*.dist-info"))
    (dist_info / "INSTALLER").write_text("deepfleet-sandbox\n")


def site_packages(python: str) -> str:
    """Where pip would put packages for the ``pythonX.Y`` of a Debian root (its
    ``/usr/local`` site directory, which Debian's python3 puts on ``sys.path``)."""
    return f"/usr/local/lib/{python}/dist-packages"


def _python_version(python: str) -> str:
    proc = sh([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
    return proc.stdout.strip()


def _check(python: str) -> str | None:
    """None if ``python`` imports onnxruntime :data:`ONNXRUNTIME` beside its numpy, else why not."""
    code = ("import numpy, onnxruntime as o; assert 'CPUExecutionProvider' in "
            "o.get_available_providers(); print(o.__version__)")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or proc.stdout.strip() != ONNXRUNTIME:
        return f"{python} cannot use it: {(proc.stderr or proc.stdout).strip()[-400:]}"
    return None


def x86_python(base: str) -> Path:
    """The interpreter x86 sandbox devices run: a venv over ``base`` (Debian's python3) that
    sees ``base``'s own packages (numpy) and has onnxruntime :data:`ONNXRUNTIME` unpacked into
    it. Made once in ``$DEEPFLEET_CACHE/runtimes`` (a few seconds plus the download) and checked
    by importing onnxruntime with it; ``base``'s own site-packages is never written.

    Raises :class:`DeviceError` saying why it could not be made (no wheel, no network, no venv).
    """
    machine = os.uname().machine
    version = _python_version(base)
    out = _files.cache_dir() / "runtimes" / f"python{version}-{machine}-onnxruntime{ONNXRUNTIME}"
    python = out / "bin" / "python3"
    if python.exists():
        return python
    whl = wheel(machine, version)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        venv = Path(tmp) / "venv"
        # --without-pip: Debian's venv needs python3-venv (ensurepip) only to install pip.
        sh([base, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
        site = venv / "lib" / f"python{version}" / "site-packages"
        unpack_wheel(whl, site)
        sh([str(venv / "bin" / "python3"), "-m", "compileall", "-q", "-j0", "-x",
            "onnxruntime/(tools|transformers|quantization)/", str(site)], check=False)
        why = _check(str(venv / "bin" / "python3"))
        if why:
            raise DeviceError(f"sandbox: onnxruntime {ONNXRUNTIME} for x86 devices: {why}")
        try:
            os.rename(venv, out)  # a venv finds its prefix from where it is: it may move
        except OSError:
            if not python.exists():  # another process won the race: use its copy
                raise
    return python


def x86_interpreter() -> Interpreter:
    """What x86 sandbox devices run: Debian's python3 with python3-numpy, like a device (and like
    the roots), with onnxruntime from :func:`x86_python`. Where Debian's python3 has no numpy the
    interpreter running deepfleet stands in (onnxruntime is one of deepfleet's dependencies).
    Never raises: when onnxruntime cannot be added the devices run numpy only and ``note`` says
    why."""
    ok = Path(SYSTEM_PYTHON).exists() and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import numpy"], capture_output=True).returncode == 0
    if not ok:
        try:
            return Interpreter(python=sys.executable, onnxruntime=metadata.version("onnxruntime"))
        except metadata.PackageNotFoundError:
            return Interpreter(python=sys.executable, onnxruntime=None,
                               note=f"{sys.executable} has no onnxruntime")
    try:
        return Interpreter(python=str(x86_python(SYSTEM_PYTHON)), onnxruntime=ONNXRUNTIME)
    except DeviceError as exc:
        return Interpreter(python=SYSTEM_PYTHON, onnxruntime=None, note=str(exc))

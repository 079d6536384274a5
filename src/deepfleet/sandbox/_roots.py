"""Debian device roots (i386, arm64, armhf) built once and cached as tar.zst.

A root is built with ``mmdebstrap --variant=extract`` (packages unpacked, no maintainer scripts
run: 7-30 s instead of minutes of emulated dpkg), then given the fix-ups those scripts would have
made (FLEET-NOTES): passwd/group from base-passwd, an ``sshd`` user, ld.so entries for the BLAS
and LAPACK alternatives plus ``ldconfig``, and byte-compiled Python. Foreign roots run through
qemu-user via binfmt_misc (:func:`ensure_binfmt`). Roots of a CPU that onnxruntime has wheels
for (arm64) get the wheel unpacked into their ``/usr/local`` site-packages, fetched on this machine
(no pip runs inside the emulated root). The cache is ``$DEEPFLEET_CACHE/roots`` or
``~/.cache/deepfleet/roots``; a recipe change bumps :data:`RECIPE` (and a root with onnxruntime
names its version) so stale tarballs are rebuilt.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from deepfleet import _files
from deepfleet.errors import DeviceError
from deepfleet.sandbox import _runtimes
from deepfleet.sandbox._proc import sh

__all__ = [
    "RECIPE",
    "build_root",
    "cache_dir",
    "cached_root",
    "ensure_binfmt",
    "extracted_root",
    "mount_root",
    "onnxruntime_in",
    "tarball_path",
    "unpack_root",
]

#: Bump whenever the package list or the fix-ups change.
RECIPE = 1
SUITE = "bookworm"
PACKAGES = ("python3", "python3-numpy", "openssh-server", "base-files", "base-passwd", "bash",
            "dash", "coreutils", "libc-bin", "procps")
#: Debian architecture -> (multiarch triplet, binfmt entry name or None when it runs natively,
#: ``platform.machine()`` of its devices).
ARCHES = {
    "i386": ("i386-linux-gnu", None, "i686"),
    "arm64": ("aarch64-linux-gnu", "qemu-aarch64", "aarch64"),
    "armhf": ("arm-linux-gnueabihf", "qemu-arm", "armv7l"),
}
#: What onnxruntime's extension needs beyond PACKAGES (libgcc_s is there already).
ONNXRUNTIME_PACKAGES = ("libstdc++6",)
_BINFMT = Path("/proc/sys/fs/binfmt_misc")
#: Never imported by the agent: not worth compiling (onnxruntime's model tools: ~300 files).
_NOT_COMPILED = "test|idlelib|lib2to3|onnxruntime/(tools|transformers|quantization)/"


def cache_dir() -> Path:
    """Where root tarballs are kept: ``$DEEPFLEET_CACHE/roots`` or ``~/.cache/deepfleet/roots``."""
    return _files.cache_dir() / "roots"


def onnxruntime_in(arch: str) -> str | None:
    """The onnxruntime version a root of ``arch`` has (None: numpy only, as no wheel exists)."""
    return _runtimes.ONNXRUNTIME if _runtimes.has_wheel(ARCHES[arch][2]) else None


def tarball_path(arch: str) -> Path:
    """Where the cached root of ``arch`` is (or will be): its name says the recipe."""
    ort = onnxruntime_in(arch)
    extra = f"-onnxruntime{ort}" if ort else ""
    return cache_dir() / f"debian-{SUITE}-{arch}-r{RECIPE}{extra}.tar.zst"


def _mirror() -> str:
    # Only the main archive: the security mirror is not needed for throw-away test devices, and
    # a security index caught mid-sync fails the whole build (seen on this machine).
    return os.environ.get("DEEPFLEET_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def ensure_binfmt(arch: str) -> str | None:
    """Make sure foreign binaries of ``arch`` run (mount binfmt_misc, enable qemu); return None
    when they do, else the reason they cannot."""
    entry = ARCHES[arch][1]
    if entry is None:
        return None
    if not (_BINFMT / "status").exists():
        proc = sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(_BINFMT)], check=False)
        if proc.returncode != 0:
            return f"cannot mount binfmt_misc: {proc.stderr.strip()}"
    if not (_BINFMT / entry).exists():
        if shutil.which("update-binfmts") is None:
            return "update-binfmts not found (install binfmt-support and qemu-user-static)"
        proc = sh(["update-binfmts", "--enable", entry], check=False)
        if proc.returncode != 0 or not (_BINFMT / entry).exists():
            return (f"cannot enable {entry} in binfmt_misc (install qemu-user-static): "
                    f"{(proc.stderr or proc.stdout).strip()}")
    flags = next((line.split(":", 1)[1].strip() for line in (_BINFMT / entry).read_text()
                  .splitlines() if line.startswith("flags:")), "")
    if "F" not in flags:
        # Without F the kernel looks for the interpreter inside the chroot, where it is not.
        return f"binfmt entry {entry} lacks the F (fix binary) flag: {flags!r}"
    return None


def _fix_up(root: Path, arch: str) -> None:
    """Do what the skipped maintainer scripts would have done, for sshd and python to work."""
    triplet = ARCHES[arch][0]
    share = root / "usr/share/base-passwd"
    passwd = (share / "passwd.master").read_text()
    (root / "etc/passwd").write_text(passwd + "sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n")
    shutil.copy(share / "group.master", root / "etc/group")
    (root / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    # numpy finds libblas.so.3 through update-alternatives links that were never made.
    (root / "etc/ld.so.conf.d/deepfleet-blas.conf").write_text(
        f"/usr/lib/{triplet}/blas\n/usr/lib/{triplet}/lapack\n")
    for d in ("root", "proc", "sys", "tmp", "run/sshd", "var/lib/deepfleet"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    if not (root / "bin/sh").exists():
        (root / "bin/sh").symlink_to("dash")
    sh(["chroot", str(root), "/sbin/ldconfig"])


def _python_of(root: Path) -> str:
    """The root's ``pythonX.Y``."""
    versions = sorted(p.name for p in (root / "usr/lib").glob("python3.*") if p.is_dir())
    if not versions:
        raise DeviceError(f"sandbox: no python3.x found in the root {root}")
    return versions[-1]


def _add_onnxruntime(root: Path, arch: str) -> None:
    """Unpack the onnxruntime wheel for the root's CPU and Python into its /usr/local
    site-packages (fetched here: no pip inside the root)."""
    python = _python_of(root)
    whl = _runtimes.wheel(ARCHES[arch][2], python.removeprefix("python"))
    _runtimes.unpack_wheel(whl, root / _runtimes.site_packages(python).lstrip("/"))


def _check_onnxruntime(root: Path, arch: str) -> None:
    """Check that the root's python3 imports its onnxruntime beside its Debian numpy (emulated:
    seconds). Without /proc and /sys its CPU probe warns and falls back, as it does on a device."""
    python = _python_of(root)
    code = "import numpy, onnxruntime as o; print(o.__version__)"
    proc = sh(["chroot", str(root), f"/usr/bin/{python}", "-c", code], check=False, timeout=600)
    if proc.returncode != 0 or proc.stdout.strip() != _runtimes.ONNXRUNTIME:
        raise DeviceError(f"sandbox: onnxruntime {_runtimes.ONNXRUNTIME} does not import in the "
                          f"{arch} root: {(proc.stderr or proc.stdout).strip()[-600:]}")


def _compile(root: Path) -> None:
    """Byte-compile the stdlib, numpy and onnxruntime's runtime (not its model tools): without it
    every cold start under qemu compiles them.

    The host's python3 does it when its version matches the root's (.pyc files do not depend on
    the CPU); otherwise the root's own python, emulated if need be.
    """
    version = _python_of(root)
    dirs = [f"/usr/lib/{version}", "/usr/lib/python3/dist-packages"]
    if (root / _runtimes.site_packages(version).lstrip("/")).is_dir():
        dirs.append(_runtimes.site_packages(version))
    host = shutil.which("python3")
    host_version = subprocess.run([host, "-c", "import sys;print('python%d.%d' % sys.version_info"
                                   "[:2])"], capture_output=True, text=True).stdout.strip() if host \
        else ""
    if host and host_version == version:
        sh([host, "-m", "compileall", "-q", "-j0", "-x", _NOT_COMPILED, "-s", str(root),
            "-p", "/", *[str(root) + d for d in dirs]], check=False)
    else:
        sh(["chroot", str(root), f"/usr/bin/{version}", "-m", "compileall", "-q", "-x",
            _NOT_COMPILED, *dirs], check=False, timeout=900)


def build_root(arch: str, dest: Path) -> None:
    """Build a fixed-up root of ``arch`` in the empty directory ``dest``."""
    if arch not in ARCHES:
        raise DeviceError(f"sandbox: no root recipe for architecture {arch!r}; known: "
                          f"{', '.join(ARCHES)}")
    if shutil.which("mmdebstrap") is None:
        raise DeviceError("sandbox: mmdebstrap not found (install it: scripts/system-deps.sh)")
    reason = ensure_binfmt(arch)
    if reason:
        raise DeviceError(f"sandbox: cannot run {arch} binaries: {reason}")
    ort = onnxruntime_in(arch)
    packages = PACKAGES + (ONNXRUNTIME_PACKAGES if ort else ())
    sh(["mmdebstrap", "--variant=extract", f"--architectures={arch}",
        f"--include={','.join(packages)}", SUITE, str(dest), _mirror()], timeout=900)
    _fix_up(dest, arch)
    if ort:
        _add_onnxruntime(dest, arch)
    _compile(dest)
    if ort:
        _check_onnxruntime(dest, arch)


def cached_root(arch: str) -> Path:
    """The tarball of the ``arch`` root, building and caching it first if needed."""
    out = tarball_path(arch)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".build-{arch}-") as tmp:
        root = Path(tmp) / "root"
        build_root(arch, root)
        part = Path(tmp) / "root.tar.zst"
        sh(["tar", "--numeric-owner", "-I", "zstd -T0 -3", "-C", str(root), "-cf", str(part),
            "."], timeout=900)
        os.replace(part, out)  # atomic: a half-written tarball is never taken for a cached one
    return out


def unpack_root(tarball: Path, dest: Path) -> None:
    """Unpack a cached root into ``dest`` (created; must not exist yet)."""
    dest.mkdir(parents=True)
    sh(["tar", "--numeric-owner", "-I", "zstd", "-C", str(dest), "-xpf", str(tarball)],
       timeout=600)


def extracted_root(tarball: Path) -> Path:
    """A read-only extracted copy of ``tarball`` beside it, made once and shared by devices."""
    out = tarball.with_name(tarball.name.removesuffix(".tar.zst"))
    if out.is_dir():
        return out
    with tempfile.TemporaryDirectory(dir=tarball.parent, prefix=".unpack-") as tmp:
        unpack_root(tarball, Path(tmp) / "root")
        try:
            os.rename(Path(tmp) / "root", out)
        except OSError:
            if not out.is_dir():  # another process won the race: use its copy
                raise
    return out


def mount_root(tarball: Path, dest: Path, scratch: Path) -> list[str]:
    """Give ``dest`` the root's files and return the mounts made (to undo, last first).

    An overlay over the shared extracted copy takes milliseconds, keeps each device's writes in
    ``scratch``, and is removed by an unmount instead of deleting ~15,000 files (which takes
    seconds here). Where overlayfs is missing, the tarball is unpacked into ``dest`` instead.
    """
    lower = extracted_root(tarball)
    upper, work = scratch / "upper", scratch / "work"
    for d in (dest, upper, work):
        d.mkdir(parents=True, exist_ok=True)
    proc = sh(["mount", "-t", "overlay", "overlay", "-o",
               f"lowerdir={lower},upperdir={upper},workdir={work}", str(dest)], check=False)
    if proc.returncode == 0:
        return [str(dest)]
    dest.rmdir()
    unpack_root(tarball, dest)
    return []

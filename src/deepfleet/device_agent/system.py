"""Part of the device program: what the device is and how it is set up (CPU, clocks, thermal
zones, BLAS threads), read from ``/proc`` and ``/sys``.

Python >= 3.8, standard library + the agent's libraries (``protocol.py``); inlined into the one
file shipped to devices (see ``bundle.py``). Host code does not import it. Every probe answers
None or an empty list where the device does not have the thing probed: absence is normal on
small boards and VMs, never an error.
"""

import ctypes
import glob
import os
import platform
import re
import time

from deepfleet.device_agent.protocol import finite

THERMAL_ROOT = "/sys/class/thermal"


# ---------------------------------------------------------------------------- sysfs files


def read_text(path, default=None):
    """The stripped text of a file, or ``default`` when it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, ValueError):
        return default


def read_number(path):
    """The number in a file, or None when it is absent, unreadable or not a number."""
    text = read_text(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def read_number_strict(path):
    """A sysfs number; OSError/ValueError when it cannot be read (a sensor error, not absence)."""
    with open(path) as f:
        return float(f.read().strip())


def natural_key(path):
    """Sort key that puts hwmon10 after hwmon9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


# ---------------------------------------------------------------------------- CPU and thermal

def cpu_model():
    """The CPU's name from /proc/cpuinfo (x86 'model name', ARM 'Hardware'/'Processor'/part)."""
    info = read_text("/proc/cpuinfo", "")
    fields = {}
    for line in info.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        if fields.get(key):
            return fields[key]
    if "CPU implementer" in fields:  # arm64 kernels give only the part numbers
        return "ARM implementer %s part %s" % (fields["CPU implementer"], fields.get("CPU part"))
    return platform.processor() or None


def cpu_affinity():
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def set_affinity(cpus):
    """Pin every thread of this process (BLAS workers included) to ``cpus``.

    ``os.sched_setaffinity(0, ...)`` pins only the calling thread on Linux; OpenBLAS's worker
    threads already exist, so each task of the process is pinned by its thread id.
    """
    cpus = set(cpus)
    os.sched_setaffinity(0, cpus)  # first: raises on a bad set before anything changed
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass  # the thread ended meanwhile


def cpu_freq_state(cpus):
    """{"governor", "freq_mhz", "freq_source"} of ``cpus``: cpufreq, else /proc/cpuinfo's MHz.

    Several governors are joined with ','; the frequency is the mean over ``cpus``. The source
    says which: 'cpuinfo' is the kernel's last-known clock (constant on VMs), None: unreadable.
    """
    governors = set()
    freqs = []
    for c in cpus:
        base = "/sys/devices/system/cpu/cpu%d/cpufreq/" % c
        g = read_text(base + "scaling_governor")
        if g:
            governors.add(g)
        f = read_number(base + "scaling_cur_freq")
        if f is not None:
            freqs.append(f / 1000.0)
    source = "cpufreq" if freqs else None
    if not freqs:
        for line in read_text("/proc/cpuinfo", "").splitlines():
            if line.startswith("cpu MHz"):
                try:
                    freqs.append(float(line.split(":", 1)[1]))
                except ValueError:
                    pass
        source = "cpuinfo" if freqs else None
    return {"governor": ",".join(sorted(governors)) or None,
            "freq_mhz": finite(sum(freqs) / len(freqs), 3) if freqs else None,
            "freq_source": source}


def thermal_zones(path=None):
    """[{"zone", "type", "temp_c"}] under ``path`` (a thermal class dir or one zone's dir)."""
    root = path or THERMAL_ROOT
    if os.path.isfile(os.path.join(root, "temp")):
        dirs = [root]
    else:
        dirs = sorted(glob.glob(os.path.join(root, "thermal_zone*")), key=natural_key)
    zones = []
    for d in dirs:
        t = read_number(os.path.join(d, "temp"))
        if t is not None:  # some zones exist but refuse reads (EINVAL/ENODATA): skip them
            zones.append({"zone": os.path.basename(d), "type": read_text(os.path.join(d, "type")),
                          "temp_c": t / 1000.0})
    return zones


def max_temp(path=None):
    """The hottest zone's temperature in °C, or None without thermal zones."""
    zones = thermal_zones(path)
    return max(z["temp_c"] for z in zones) if zones else None


def settle_temperature(thermal):
    """Wait, idle, until the hottest zone varies by <= tolerance over a window (bounded).

    A device still hot from the previous measurement may throttle during this one; waiting
    until the temperature is steady makes consecutive measurements comparable. Returns
    {"settle_s", "settled" (None: no thermal zone or disabled), "temp_c"}.
    """
    t0 = time.monotonic()
    first = max_temp(thermal["path"])
    if first is None or thermal["settle_max_s"] <= 0:
        return {"settle_s": 0.0, "settled": None, "temp_c": first}
    window, poll = thermal["window_s"], min(0.25, thermal["window_s"] / 4.0)
    history = [(t0, first)]
    settled = False
    while True:
        time.sleep(poll)
        now = time.monotonic()
        if now - t0 >= thermal["settle_max_s"]:
            break
        temp = max_temp(thermal["path"])
        if temp is None:
            continue  # a failed read (some zones refuse reads at times): the bound still holds
        history.append((now, temp))
        while len(history) > 2 and history[1][0] <= now - window:
            history.pop(0)
        temps = [v for _, v in history]
        if now - t0 >= window and max(temps) - min(temps) <= thermal["tolerance_c"]:
            settled = True
            break
    return {"settle_s": round(time.monotonic() - t0, 3), "settled": settled,
            "temp_c": history[-1][1]}


# ---------------------------------------------------------------------------- BLAS threads

# (set, get) symbol pairs of BLAS libraries whose thread count can be changed at run time.
_BLAS_SYMBOLS = (
    ("openblas", "scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),  # numpy 2 wheels
    ("openblas", "scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas", "openblas_set_num_threads64_", "openblas_get_num_threads64_"),  # numpy 1.x wheels
    ("openblas", "openblas_set_num_threads", "openblas_get_num_threads"),  # distribution OpenBLAS
    ("mkl", "MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
    ("blis", "bli_thread_set_num_threads", "bli_thread_get_num_threads"),
)
_blas_cache = []


def blas_control():
    """{"library", "vendor", "set", "get"} for the BLAS numpy loaded, found in /proc/self/maps.

    ``set``/``get`` are ctypes functions or None. Debian's netlib reference BLAS
    (``.../blas/libblas.so.3``) has no thread control because it is single-threaded.
    """
    if _blas_cache:
        return _blas_cache[0]
    paths = []
    for line in (read_text("/proc/self/maps", "") or "").splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6:
            p = parts[5].strip()
            base = os.path.basename(p).lower()
            if ".so" in base and ("blas" in base or "mkl" in base or "blis" in base) and p not in paths:
                paths.append(p)
    found = {"library": paths[0] if paths else None, "vendor": None, "set": None, "get": None}
    for p in paths:
        try:
            lib = ctypes.CDLL(p)  # already mapped: dlopen only returns a handle
        except OSError:
            continue
        for vendor, set_name, get_name in _BLAS_SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.argtypes, setter.restype = [ctypes.c_int], None
                getter.argtypes, getter.restype = [], ctypes.c_int
                found = {"library": p, "vendor": vendor, "set": setter, "get": getter}
                break
        if found["set"] is not None:
            break
        if "/blas/libblas.so" in p:
            found = {"library": p, "vendor": "reference", "set": None, "get": None}
    _blas_cache.append(found)
    return found


def blas_threads():
    """(threads in effect or None, note)."""
    b = blas_control()
    if b["get"] is not None:
        return int(b["get"]()), "%s reports it" % b["vendor"]
    if b["vendor"] == "reference":
        return 1, "reference BLAS is single-threaded"
    return None, "unknown: no thread control found in BLAS library %s" % b["library"]


def set_blas_threads(n):
    """Ask the BLAS for ``n`` threads; return (threads in effect as it reports them, note)."""
    b = blas_control()
    if b["set"] is None:
        threads, note = blas_threads()
        if threads == n:
            return threads, note  # e.g. 1 asked of the single-threaded reference BLAS
        return threads, "could not set %d threads: %s" % (n, note)
    b["set"](int(n))
    got = int(b["get"]())
    return got, ("%s set to %d" % (b["vendor"], got)) if got == n else (
        "%s refused %d threads, runs with %d" % (b["vendor"], n, got))



# ---------------------------------------------------------------------------- memory

STATUS_FILE = "/proc/self/status"
CLEAR_REFS_FILE = "/proc/self/clear_refs"


def status_kb(field, path=STATUS_FILE):
    """A ``Vm*`` line of /proc/self/status (``VmRSS``: resident now, ``VmHWM``: peak resident)
    in kB (KiB), or None where there is no such file or line."""
    for line in (read_text(path, "") or "").splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    return None


def release_free_memory():
    """Give heap memory that is free but still held by the C allocator back to the system
    (glibc's ``malloc_trim(0)``), so that pages freed by an earlier model are not reused, unseen,
    by the next one. Best effort: False where the C library has no ``malloc_trim`` (musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


class PeakMemory:
    """How far this process's resident memory rises above what it is at creation.

    Linux >= 4.0: writing "5" to /proc/self/clear_refs resets the peak resident set (``VmHWM``)
    to the resident set now, so ``VmHWM`` read later minus the resident set at creation is the
    exact peak rise in between (method ``clear_refs``). Where the file cannot be written the
    peak cannot be reset (method ``vmhwm``): a rise is still exact when it sets a new lifetime
    peak, and unknown (None, with a note) when the process was bigger once before. Without
    /proc/self/status (not Linux) nothing is measured. Resident memory counts pages of shared
    libraries this process touches; see docs/measurement.md for what that means.
    """

    def __init__(self):
        self.method = None
        self.note = None
        self._old_peak = None
        if status_kb("VmRSS") is None:
            self.note = "not measured: no /proc/self/status (peak memory is measured on Linux)"
            self.baseline_kb = None
            return
        try:
            with open(CLEAR_REFS_FILE, "w") as f:
                f.write("5")
            self.method = "clear_refs"
        except OSError as exc:
            self.method = "vmhwm"
            self._old_peak = status_kb("VmHWM")
            self.note = ("%s cannot be written (%s): the peak cannot be reset, and counts only "
                         "when it exceeds the process's earlier peak" % (CLEAR_REFS_FILE, exc))
        self.baseline_kb = status_kb("VmRSS")

    @property
    def baseline_mb(self):
        return None if self.baseline_kb is None else round(self.baseline_kb / 1024.0, 3)

    def peak_mb(self):
        """The peak rise so far in MiB (2^20 bytes), or None when it cannot be known."""
        if self.baseline_kb is None:
            return None
        peak = status_kb("VmHWM")
        if peak is None:
            return None
        if self.method == "vmhwm" and (self._old_peak is None or peak <= self._old_peak):
            return None  # the process's earlier peak hides this one
        return round(max(0, peak - self.baseline_kb) / 1024.0, 3)

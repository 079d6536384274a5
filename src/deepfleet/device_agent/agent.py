#!/usr/bin/env python3
"""deepfleet device agent: the program that runs on devices.

Python >= 3.8, standard library + numpy only (no torch, pandas, pyarrow, ray): it must run on an
Intel Edison or a small ARM board. Devices get ONE file with one hash: ``bundle.py`` builds it
from this module by inlining the agent's libraries (``format``, ``runtime``, ``protocol``,
``system``, ``backends``, ``energy`` in ``deepfleet/device_agent/``) in place of the import
lines below. The libraries import only the standard library, numpy and each other; tests check
that by AST, and run the built file under ``python -I`` with an import allowlist.

``python3 agent.py serve`` (the built file) is the device protocol: a persistent loop that
answers one JSON object per line on stdin with one JSON object per line on stdout (hello, ping,
measure, infer, bye), measuring latency distributions and energy per inference. The request
fields are documented in ``protocol.py``, the measure response in :func:`measure`.

Run ``python3 agent.py hello`` on a device to see what the agent finds there.
"""

import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

from deepfleet.device_agent.backends import (
    ModelCache,
    available_backends,
    choose_backend,
    make_input,
)
from deepfleet.device_agent.energy import (
    Sampler,
    energy_result,
    estimate_energy_mj,
    list_energy_sources,
    open_energy_source,
    sample_idle,
    time_estimate,
)
from deepfleet.device_agent.format import compressor_label, file_digest
from deepfleet.device_agent.protocol import (
    PROTOCOL_VERSION,
    AgentError,
    finite,
    parse_hello,
    parse_infer,
    parse_measure,
)
from deepfleet.device_agent.system import (
    PeakMemory,
    blas_control,
    blas_threads,
    cpu_affinity,
    cpu_freq_state,
    cpu_model,
    max_temp,
    release_free_memory,
    set_affinity,
    settle_temperature,
    thermal_zones,
)

# 0.2.0: the serve protocol (hello/ping/measure/infer/bye), energy sources, BLAS thread control.
# 0.2.1: faster conv (as_strided windows, one im2col matmul, no moveaxis copy) and pooling (one
#        axis at a time over strided slices, not a reduction over a window view): same outputs,
#        different timings (lenet5 batch 1 about 3x faster).
# 0.3.0: encoded weights (fixed-point codes, codebooks, packed bits) decoded at load; the
#        compressor label of pipeline manifests ("deepiot+fixedpoint").
# 0.3.1: built by bundle.py from the program and its libraries (the artifact format, the
#        request schema, ...): same protocol, measurements and outputs; hello adds agent_sha256
#        (the running file's own sha256, which the host compares with the file it shipped).
# 0.4.0: "backend": "auto" (the default; the first of the request's "backends", the device's
#        preference, that is installed and that the artifact has) and every response names
#        backend, backend_version, provider and, for a fallback, backend_note; the model is loaded
#        afresh per request by default ("fresh"), timed (init_ms, first_run_ms); peak resident
#        memory of loading and running it (memory_peak_mb); CPU time of each run beside its
#        wall time (cpu_p50_ms); a time-based energy estimate from the device's stated power.
# 0.4.1: the runtime's `gather` op (models that read only the inputs DeepIoT kept); the numpy
#        runtime compiles a model's ops at load (weights fused and transposed, run()
#        as generated straight-line code, recurrent input projections batched over time): same
#        outputs, different timings (compressed deepsense and bilstm several times faster).
# 0.5.0: backend "litert": model.tflite (batch 1) on ai_edge_litert's or tflite_runtime's
#        interpreter, one thread unless asked; a larger batch runs sample by sample and
#        backend_note says so; hello lists litert when an interpreter is installed.
# 0.5.1: the numpy runtime's LSTM step makes one numpy call fewer (f * c and i * g in one
#        division): same outputs, compressed bilstm at batch 1 ~9 % faster.
# 0.5.2: a small GRU (batch x hidden^2 < 1024) makes one numpy call fewer a step ((1 - z) * n
#        and z * h in one division, z computed twice in the matmul); copies by slice
#        assignment; ReLU against a same-shaped zeros view: same outputs, compressed deepsense
#        and lenet5 at batch 1 ~9 % faster.
# 0.5.3: a mean or sum over a sequence's time axis is one matmul by a vector (3x faster than
#        add.reduce at batch 1, 8x at batch 64): outputs equal to float32 rounding.
AGENT_VERSION = "0.5.3"
EXACT_CI_LIMIT = 5000  # above this many runs the median CI uses the normal approximation


def _own_sha256():
    """sha256 of the file this program was started from (the built agent on a device), read
    once at start: a file replaced later does not change what this process runs."""
    try:
        return file_digest(os.path.abspath(__file__))
    except (NameError, OSError):  # no file: run from a string or a zip
        return None


AGENT_SHA256 = _own_sha256()


def log(message):
    sys.stderr.write("agent[%d]: %s\n" % (os.getpid(), message))
    sys.stderr.flush()


def _utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


# ---------------------------------------------------------------------------- statistics


def _median_rank(n, level):
    """(l, coverage): the largest 1-based rank l with P(B <= l-1) <= (1-level)/2, B ~ Bin(n, 1/2).

    [x_(l), x_(n-l+1)] then covers the population median with probability coverage =
    1 - 2 P(B <= l-1) >= level, for ANY continuous distribution (order statistics; no normality
    assumed: latency distributions are skewed and multi-modal). l = 0 when n is too small.
    Exact (log-space binomial, no underflow) up to EXACT_CI_LIMIT; normal approximation with
    continuity correction above, where it is accurate to a rank.
    """
    tail = (1.0 - level) / 2.0
    if n > EXACT_CI_LIMIT:
        z = statistics.NormalDist().inv_cdf(1.0 - tail)
        rank = int(math.floor(n / 2.0 + 0.5 - z * math.sqrt(n) / 2.0))
        cdf = statistics.NormalDist(n / 2.0, math.sqrt(n) / 2.0).cdf(rank - 0.5)
        return max(rank, 0), 1.0 - 2.0 * cdf
    log_norm = math.lgamma(n + 1) - n * math.log(2.0)
    cdf = 0.0
    k = 0
    while k < n:
        p = math.exp(log_norm - math.lgamma(k + 1) - math.lgamma(n - k + 1))
        if cdf + p > tail:
            break
        cdf += p
        k += 1
    return k, 1.0 - 2.0 * cdf  # ranks 0..k-1 were summed: P(B <= k-1) = cdf


def median_ci(sorted_values, level=0.95):
    """Distribution-free CI of the median of ascending ``sorted_values``: (low, high, coverage).

    None when there are too few values for any interval at ``level`` (fewer than 6 at 95 %).
    """
    n = len(sorted_values)
    rank, coverage = _median_rank(n, level)
    if rank < 1:
        return None
    return sorted_values[rank - 1], sorted_values[n - rank], coverage


def _median(sorted_values):
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def timed_runs(run, x, spec):
    """Run ``run(x)`` until the stopping rule holds; return (latencies in ns, CPU times in ns,
    stop reason).

    Rule (DESIGN §6 plus a precision target): never stop before ``min_runs`` runs AND
    ``min_seconds`` of timed phase; always stop at ``max_runs`` or ``max_seconds``; in between,
    stop as soon as the distribution-free CI of the median is narrower than ``ci_target`` x p50
    ("ci"), or at once when ``ci_target`` is null ("minimum"). The CI is recomputed every 5 % more
    runs (a sort per check), so checking stays a small fraction of the work and a stop comes at
    most 5 % late. Only ``run(x)`` is inside each timed interval. The measuring thread's CPU
    time is read just outside it (``time.thread_time_ns``), so a run's CPU time can exceed its
    wall time by the two clock reads (well under a microsecond); it misses work done on other
    threads (a runtime's worker threads), which the caller counts with the process's CPU time.
    """
    clock = time.perf_counter_ns
    cpu_clock = time.thread_time_ns
    min_runs, max_runs = spec["min_runs"], spec["max_runs"]
    min_ns, max_ns = spec["min_seconds"] * 1e9, spec["max_seconds"] * 1e9
    target, level = spec["ci_target"], spec["ci_level"]
    lat = []
    cpu = []
    next_check = 0
    start = clock()
    while True:
        c = cpu_clock()
        a = clock()
        run(x)
        b = clock()
        cpu.append(cpu_clock() - c)
        lat.append(b - a)
        n = len(lat)
        elapsed = b - start
        if n >= max_runs:
            return lat, cpu, "max_runs"
        if elapsed >= max_ns:
            return lat, cpu, "max_seconds"
        if n < min_runs or elapsed < min_ns:
            continue
        if target is None:
            return lat, cpu, "minimum"
        if n >= next_check:
            s = sorted(lat)
            ci = median_ci(s, level)
            if ci is not None and ci[1] - ci[0] <= target * _median(s):
                return lat, cpu, "ci"
            next_check = n + max(1, n // 20)


def latency_summary(lat_ns, level, target):
    """The latency fields of a measure response from per-run times in ns (values in ms)."""
    ms = np.sort(np.asarray(lat_ns, dtype=np.float64) / 1e6)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])  # linear interpolation (numpy's default)
    ci = median_ci(ms.tolist(), level)
    rel = (ci[1] - ci[0]) / p50 if ci is not None and p50 > 0 else None
    return {
        "runs": int(ms.size),
        "latencies_ms": [round(float(v) / 1e6, 6) for v in lat_ns],  # run order, ns resolution
        "p50_ms": finite(p50), "p90_ms": finite(p90), "p99_ms": finite(p99),
        "mean_ms": finite(ms.mean()),
        "std_ms": finite(ms.std(ddof=1)) if ms.size > 1 else None,  # sample std
        "min_ms": finite(ms[0]), "max_ms": finite(ms[-1]),
        "p50_ci_low_ms": finite(ci[0]) if ci else None,
        "p50_ci_high_ms": finite(ci[1]) if ci else None,
        "ci_coverage": finite(ci[2]) if ci else None,
        "ci_level": level,
        "ci_rel_width": finite(rel),
        "ci_target": target,
        "ci_met": bool(rel is not None and target is not None and rel <= target),
    }


# ---------------------------------------------------------------------------- requests


_PRIMED = set()  # runtimes whose one-time set-up this process has paid (see _load)


def _load(spec, cache, opened, name):
    """(backend instance, memory tracker or None, load ms): a fresh instance (timed, its memory
    tracked from just before it is loaded) unless the request allows a cached one and there is
    one.

    The first load of a runtime in a process pays one-time costs that are the runtime's, not
    the model's (onnxruntime's global environment and thread pools, the pages of its library,
    numpy's npz reader): measured, they would go to whichever artifact happened to come first.
    So the first time, the model is loaded and run once unmeasured. An old instance is dropped
    before the measured load (freed by reference counting: nothing else holds a model), and the
    C allocator's free memory handed back, so the load cannot reuse it unseen."""
    t0 = time.perf_counter()
    if not spec["fresh"]:
        backend = cache.cached(opened, name)
        if backend is not None:
            return backend, None, 0.0
    cache.drop(opened, name)
    if name not in _PRIMED:
        primer = cache.load(opened, name, spec["threads"])
        primer.run(primer.prepare(make_input(primer.input_shape, spec["batch"], spec["seed"])))
        cache.drop(opened, name)
        del primer
        _PRIMED.add(name)
    release_free_memory()
    memory = PeakMemory()
    backend = cache.load(opened, name, spec["threads"])
    return backend, memory, (time.perf_counter() - t0) * 1e3


def _cpu_fields(cpu_ns, process_cpu_s, runs):
    """CPU time per run: the measuring thread's (p50, mean) and the whole process's (mean over
    the timed phase: a runtime's worker threads count there)."""
    ms = np.asarray(cpu_ns, dtype=np.float64) / 1e6
    return {"cpu_p50_ms": finite(np.percentile(ms, 50)) if ms.size else None,
            "cpu_mean_ms": finite(ms.mean()) if ms.size else None,
            "process_cpu_ms": finite(process_cpu_s * 1e3 / runs) if runs else None}


def measure(req, cache):
    """Measure one artifact's latency distribution (and energy) on this device.

    Order: check the artifact (hash, when its files changed) -> choose the backend ("auto": the
    first of the device's preference that is installed and that the artifact has) -> affinity ->
    load the model afresh (timed: init_ms; memory tracked from here) -> threads -> first
    inference (timed) -> readings before -> thermal settle -> idle power -> warm-up -> peak
    memory -> timed runs (wall and CPU time each) with the energy sampler running -> readings
    after. With "fresh": false a cached instance is used when there is one: then init_ms,
    first_run_ms and memory are null (the model was loaded by an earlier request).

    Response fields, besides ok/op/id/agent_ms: agent_version, protocol, machine, python, numpy,
    artifact, artifact_hash, model_cached, load_ms (hash check + load), verify_ms, backend (the
    runtime that ran), backend_requested, backend_version, provider, backend_note (why "auto"
    passed over a preferred runtime, how a batch runs when it is not one call of the runtime;
    null otherwise), backend_file_sha256 (of model.onnx / model.ts / model.tflite when one ran), init_ms (the runtime building its model from the files),
    first_run_ms (the first inference of the fresh model), memory_peak_mb (peak resident memory
    of loading and running the model, above the process's resident memory before: MiB),
    memory_init_mb (the same up to the end of loading), memory_baseline_mb (the process before
    loading), memory_method (clear_refs | vmhwm | null), memory_note, batch, input_shape, seed,
    model, compressor (its method), params, macs, weights_bytes (from manifest.json),
    threads_requested, threads (in effect, null if unknown), threads_note, blas_library,
    affinity, warmup, min_runs, max_runs, min_seconds, max_seconds, stop_reason (ci | minimum |
    max_runs | max_seconds), timed_s, gc_disabled, runs, latencies_ms (every timed run, in
    order), p50_ms, p90_ms, p99_ms, mean_ms, std_ms, min_ms, max_ms, p50_ci_low_ms,
    p50_ci_high_ms, ci_level, ci_coverage, ci_rel_width, ci_target, ci_met, cpu_p50_ms and
    cpu_mean_ms (the measuring thread's CPU time per run), process_cpu_ms (the process's CPU
    time over the timed runs per run: all threads), governor_before/after,
    freq_before/after_mhz, freq_source, temp_before/after_c, thermal (settle result),
    loadavg_before/after, energy (see energy_result; plus the time-based estimate:
    time_estimated_energy_per_inference_mj, time_estimate_basis, stated_power_w), timing_ms
    {load, first_run, settle, idle, warmup, timed, total}, started_at, ended_at (ISO 8601 UTC).
    """
    spec = parse_measure(req)
    t_start = time.perf_counter()
    started_at = _utc_now()
    opened = cache.open(spec["artifact"], spec["verify"])
    manifest, digest = opened["manifest"], opened["digest"]
    name, backend_note = choose_backend(spec["backend"], spec["backends"], opened["directory"], manifest)
    source, energy_note = open_energy_source(spec["energy"])
    old_affinity = None
    if spec["cpus"] is not None:
        old_affinity = cpu_affinity()
        try:
            set_affinity(spec["cpus"])
        except (OSError, ValueError, AttributeError) as exc:
            raise AgentError("bad_request", "'cpus' %r cannot be used here (%s); this process may "
                             "run on %s" % (spec["cpus"], exc, old_affinity)) from None
    try:
        backend, memory, load_ms = _load(spec, cache, opened, name)
        memory_init = memory.peak_mb() if memory is not None else None
        if spec["threads"] is None:
            threads, threads_note = backend.threads()
            threads_note = "left as found: " + threads_note
        else:
            threads, threads_note = backend.set_threads(spec["threads"])
        x = backend.prepare(make_input(backend.input_shape, spec["batch"], spec["seed"]))
        first_run_ms = None
        if memory is not None:  # a fresh model: its first inference (lazy set-up, cold caches)
            t = time.perf_counter()
            backend.run(x)
            first_run_ms = (time.perf_counter() - t) * 1e3
        cpus = cpu_affinity()
        thermal_path = spec["thermal"]["path"]
        freq_before = cpu_freq_state(cpus)
        load_before = os.getloadavg()
        t = time.perf_counter()
        settle = settle_temperature(spec["thermal"])
        settle_ms = (time.perf_counter() - t) * 1e3
        temp_before = max_temp(thermal_path)
        t = time.perf_counter()
        idle = (None, 0, None)  # idle_s = 0: the caller asked for gross energy
        if source is not None and spec["energy"]["idle_s"] > 0:
            idle = sample_idle(source, spec["energy"]["sample_hz"], spec["energy"]["idle_s"])
        idle_ms = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        for _ in range(spec["warmup"]):
            backend.run(x)
        warmup_ms = (time.perf_counter() - t) * 1e3
        # Read here, not after the timed runs: those repeat the same inference, and the agent's
        # own per-run records (which grow with the run count) are not the model's memory.
        memory_peak = memory.peak_mb() if memory is not None else None
        sampler = None
        if source is not None:
            sampler = Sampler(source, spec["energy"]["sample_hz"])
            sampler.start()
            sampler.first.wait(10.0)
        gc_was_enabled = gc.isenabled()
        if spec["disable_gc"]:
            # A collection inside a timed run is noise, not the model's cost. No gc.collect()
            # first: with collection off nothing can trigger one, and a full collection costs
            # ~10 ms, more than everything else this request adds to the model's runs.
            gc.disable()
        process_cpu = time.process_time()
        t_timed = time.perf_counter()
        try:
            lat, cpu, reason = timed_runs(backend.run, x, spec)
        finally:
            t_end = time.perf_counter()
            process_cpu = time.process_time() - process_cpu
            timed_ms = (t_end - t_timed) * 1e3
            if gc_was_enabled:
                gc.enable()
            if sampler is not None:
                time.sleep(source.lag_s)  # the sensor still owes the last runs' readings
                sampler.stop()
        temp_after = max_temp(thermal_path)
        freq_after = cpu_freq_state(cpus)
        load_after = os.getloadavg()
    finally:
        if old_affinity is not None:
            set_affinity(old_affinity)
    runs = len(lat)
    estimate = estimate_energy_mj(manifest, spec["batch"])
    energy = energy_result(spec["energy"], source, energy_note, idle, sampler, (t_timed, t_end), runs,
                           estimate)
    summary = latency_summary(lat, spec["ci_level"], spec["ci_target"])
    energy.update(time_estimate(spec["power"], summary["p50_ms"]))
    resp = {
        "ok": True,
        "agent_version": AGENT_VERSION,
        "protocol": PROTOCOL_VERSION,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "artifact": opened["directory"],
        "artifact_hash": digest,
        "model_cached": memory is None,
        "load_ms": finite(opened["verify_ms"] + load_ms, 3),
        "verify_ms": finite(opened["verify_ms"], 3),
        "backend": name,
        "backend_requested": spec["backend"],
        "backend_version": backend.version,
        "provider": backend.provider,
        "backend_note": "; ".join(n for n in (backend_note, backend.batch_note(spec["batch"])) if n)
        or None,
        "backend_file_sha256": backend.file_sha256,
        "init_ms": finite(backend.init_ms, 3) if memory is not None else None,
        "first_run_ms": finite(first_run_ms, 3),
        "memory_peak_mb": memory_peak,
        "memory_init_mb": memory_init,
        "memory_baseline_mb": memory.baseline_mb if memory is not None else None,
        "memory_method": memory.method if memory is not None else None,
        "memory_note": memory.note if memory is not None else
        "cached model (\"fresh\": false): loaded by an earlier request, not measured",
        "batch": spec["batch"],
        "input_shape": list(backend.input_shape),
        "seed": spec["seed"],
        "model": manifest.get("model"),
        "compressor": compressor_label(manifest.get("compressor")),
        "params": manifest.get("params"),
        "macs": manifest.get("macs"),
        "weights_bytes": manifest.get("weights_bytes"),
        "threads_requested": spec["threads"],
        "threads": threads,
        "threads_note": threads_note,
        "blas_library": blas_control()["library"] if name == "numpy" else None,
        "affinity": cpus,
        "warmup": spec["warmup"],
        "min_runs": spec["min_runs"],
        "max_runs": spec["max_runs"],
        "min_seconds": spec["min_seconds"],
        "max_seconds": spec["max_seconds"],
        "stop_reason": reason,
        "timed_s": finite(timed_ms / 1e3, 6),
        "gc_disabled": spec["disable_gc"],
        "governor_before": freq_before["governor"],
        "governor_after": freq_after["governor"],
        "freq_before_mhz": freq_before["freq_mhz"],
        "freq_after_mhz": freq_after["freq_mhz"],
        "freq_source": freq_before["freq_source"],
        "temp_before_c": finite(temp_before, 3),
        "temp_after_c": finite(temp_after, 3),
        "thermal": settle,
        "loadavg_before": [round(v, 3) for v in load_before],
        "loadavg_after": [round(v, 3) for v in load_after],
        "energy": energy,
        "started_at": started_at,
        "ended_at": _utc_now(),
    }
    resp.update(summary)
    resp.update(_cpu_fields(cpu, process_cpu, runs))
    resp["timing_ms"] = {
        "load": round(opened["verify_ms"] + load_ms, 3),
        "first_run": round(first_run_ms, 3) if first_run_ms is not None else None,
        "settle": round(settle_ms, 3), "idle": round(idle_ms, 3),
        "warmup": round(warmup_ms, 3), "timed": round(timed_ms, 3),
        "total": round((time.perf_counter() - t_start) * 1e3, 3),
    }
    return resp


def infer(req, cache):
    """Run an artifact once on ``input`` (or the measure input of ``batch``/``seed``).

    Response: outputs (nested lists of float32 values as JSON numbers), shapes, artifact_hash.
    """
    spec = parse_infer(req)
    backend, _, digest, _, _ = cache.get(spec["artifact"], spec["backend"], spec["verify"])
    if spec["input"] is None:
        x = make_input(backend.input_shape, spec["batch"], spec["seed"])
    else:
        try:
            x = np.asarray(spec["input"], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise AgentError("bad_request", "'input' must be a nested list of numbers (%s)" % exc) from None
        if x.ndim < 1 or tuple(x.shape[1:]) != tuple(backend.input_shape):
            raise AgentError("bad_request", "'input' must have shape (batch, %s), but got %s"
                             % (", ".join(map(str, backend.input_shape)), list(x.shape)))
    outs = backend.numpy_outputs(backend.run(backend.prepare(x)))
    return {"ok": True, "artifact_hash": digest, "outputs": [o.tolist() for o in outs],
            "shapes": [list(o.shape) for o in outs]}


def hello(req, cache=None):
    """What this device and agent offer (fields: the protocol comment in ``protocol.py``)."""
    extra = parse_hello(req)
    cpus = cpu_affinity()
    freq = cpu_freq_state(cpus)
    sources, notes = list_energy_sources(extra)
    names, versions = available_backends()
    blas = blas_control()
    threads, _ = blas_threads()
    return {
        "ok": True,
        "agent_version": AGENT_VERSION,
        "agent_sha256": AGENT_SHA256,
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "system": platform.system(),
        "release": platform.release(),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": cpus,
        "governor": freq["governor"],
        "freq_mhz": freq["freq_mhz"],
        "freq_source": freq["freq_source"],
        "thermal_zones": thermal_zones(),
        "energy_sources": sources,
        "energy_notes": notes,
        "backends": names,
        "backend_versions": versions,
        "blas": {"library": blas["library"], "vendor": blas["vendor"], "threads": threads,
                 "settable": blas["set"] is not None},
        "ops": sorted(HANDLERS),
    }


def ping(req, cache=None):
    return {"ok": True}


def bye(req, cache=None):
    return {"ok": True}


HANDLERS = {"hello": hello, "ping": ping, "measure": measure, "infer": infer, "bye": bye}


def handle_line(line, cache):
    """(response dict, whether to exit) for one request line (bytes). Never raises."""
    t0 = time.perf_counter()
    req_id, op = None, None
    try:
        try:
            req = json.loads(line.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            raise AgentError("bad_request", "a request must be one JSON object per line (%s), but "
                             "got %r" % (exc, line[:200])) from None
        if not isinstance(req, dict):
            raise AgentError("bad_request", "a request must be a JSON object, but got %r" % (req,))
        req_id, op = req.get("id"), req.get("op")
        handler = HANDLERS.get(op) if isinstance(op, str) else None
        if handler is None:
            raise AgentError("bad_request", "unknown op %r; known ops: %s" % (op, ", ".join(sorted(HANDLERS))))
        resp = handler(req, cache)
    except AgentError as exc:
        resp = {"ok": False, "error": str(exc), "kind": exc.kind}
    except Exception as exc:
        traceback.print_exc()
        resp = {"ok": False, "error": "internal error in the agent: %s: %s (traceback on its "
                "stderr)" % (type(exc).__name__, exc), "kind": "internal"}
    resp["op"] = op
    if req_id is not None:
        resp["id"] = req_id
    resp["agent_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    return resp, bool(resp["ok"] and op == "bye")


def encode(resp):
    """One response line (bytes). A value JSON cannot hold becomes an internal error."""
    try:
        return (json.dumps(resp, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        log("cannot encode a response: %s" % exc)
        fallback = {"ok": False, "kind": "internal", "op": resp.get("op"),
                    "error": "internal error in the agent: response not JSON-encodable (%s)" % exc}
        if "id" in resp:
            fallback["id"] = resp["id"]
        return (json.dumps(fallback) + "\n").encode("utf-8")


def serve(stdin=None, stdout_fd=None):
    """The request loop on stdin/stdout; returns the exit status (0 on bye or end of input)."""
    if stdout_fd is None:
        # Keep the real stdout for the protocol and point fd 1 (and sys.stdout) at stderr, so
        # a print or a C library's message can never interleave with a response line.
        stdout_fd = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    out = os.fdopen(stdout_fd, "wb")
    inp = stdin if stdin is not None else sys.stdin.buffer
    cache = ModelCache()
    log("deepfleet agent %s serving (python %s, numpy %s)"
        % (AGENT_VERSION, platform.python_version(), np.__version__))
    while True:
        line = inp.readline()
        if not line:
            log("end of input: exiting")
            return 0
        if not line.strip():
            continue
        resp, done = handle_line(line, cache)
        try:
            out.write(encode(resp))
            out.flush()
        except BrokenPipeError:
            return 0  # the orchestrator went away: nobody to answer
        if done:
            log("bye")
            return 0


USAGE = """usage: agent.py serve | hello | --version
  serve    answer JSON-line requests on stdin/stdout (see the protocol comment in this file)
  hello    print what this device offers, as JSON
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["serve"]:
        return serve()
    if argv == ["hello"]:
        print(json.dumps(hello({}), indent=1))
        return 0
    if argv == ["--version"]:
        print(AGENT_VERSION)
        return 0
    sys.stderr.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())

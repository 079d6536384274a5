"""Benchmark of the device runtimes (issue 13): numpy, onnxruntime, torch and (with the extra
deepfleet[litert]) LiteRT on ONE pinned core.
Prints and saves JSON (``results/runtimes.json``; each part is merged in under its own key).

Every latency is the p50 of the agent's own ``measure`` (in-process, the backend named
explicitly, 1 thread, pinned to ``--cpu``), i.e. what a device measures; each figure is the
median over ``--rounds`` rounds that interleave the runtimes and variants, so that a burst of
load on this shared machine hits them alike; the load average is recorded with every figure.

Parts (``--parts``, comma list):

* ``compress``  make the compressions the other parts measure (cached; ``_runtime_cases.py``);
* ``latency``   lenet5, mlp, deepsense, bilstm: DeepIoT at the README's targets and the original,
                batch 1 and 64, p50 on numpy / onnxruntime / torch / litert (when the artifacts
                have model.tflite: batch 64 is 64 one-sample calls), the compressed/original ratio
                per runtime, and the compute floor 2 x MACs / this core's fp32 GEMM peak (numpy
                BLAS, one thread) with each runtime's multiple of it;
* ``int8``      DeepIoT + 8-bit fixed point with 8-bit activations (an int8 QDQ model.onnx) and
                the original lenet5 at 8 bits, each against its fp32 twin (same weights, float
                graph) on onnxruntime, and onnxruntime's per-op profile of lenet5 at batch 64;
* ``ranking``   Kendall tau between numpy's and onnxruntime's p50 over candidates drawn as the
                demo search draws them (lenet5 and mlp), and their Pareto fronts (validation
                accuracy vs p50) per runtime;
* ``floor``     the numpy runtime's floor on compressed deepsense and bilstm at batch 1: every
                numpy call of a recurrent loop step timed alone, times the steps, plus the rest of
                the model, against 3 x onnxruntime's p50 (issue 13's bar) and the runtime's p50;
* ``memory``    peak resident memory added by loading and running each model (batch 1 and 64)
                through the shipped agent's code, one fresh process per (model, runtime) (the
                agent does not report peak memory yet).

    PYTHONPATH=src python benchmarks/runtimes.py [--parts compress,latency,int8,ranking,memory]
        [--cpu N] [--rounds 3] [--workers 2] [--candidates 40] [--models lenet5,...] [--smoke]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one thread everywhere, set before numpy and torch load

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _runtime_cases as cases  # noqa: E402
from _results import save_case  # noqa: E402

DEFAULT_OUT = HERE / "results" / "runtimes.json"
RUNTIMES = ("numpy", "onnxruntime", "torch", "litert")
OWN_FILES = {"torch": "model.ts", "litert": "model.tflite"}  # timed only where the artifact has it
BATCHES = (1, 64)
PARTS = ("compress", "latency", "int8", "ranking", "memory", "floor")


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class Meter:
    """The agent's ``measure`` in this process, pinned to one CPU with one thread."""

    def __init__(self, cpu: int, seconds: float) -> None:
        from deepfleet.device_agent.agent import measure
        from deepfleet.device_agent.backends import ModelCache

        self.measure, self.cache = measure, ModelCache(size=64)
        self.cpu, self.seconds = cpu, seconds

    def p50(self, artifact: str, backend: str, batch: int) -> dict[str, Any]:
        r = self.measure({"op": "measure", "artifact": artifact, "backend": backend, "batch": batch,
                          "threads": 1, "cpus": [self.cpu], "warmup": 10, "min_runs": 20,
                          "min_seconds": self.seconds, "max_seconds": 8 * self.seconds,
                          "ci_target": 0.02, "energy": {"source": "none"}}, self.cache)
        return {"p50_ms": r["p50_ms"], "runs": r["runs"], "ci_rel_width": r["ci_rel_width"],
                "load": [round(v, 2) for v in r["loadavg_before"]]}


def interleaved(meter: Meter, cells: list[tuple[str, str, int]], rounds: int) -> dict[tuple[str, str, int], dict[str, Any]]:
    """p50 of every (artifact, backend, batch) cell: the median over ``rounds`` rounds, each round
    measuring every cell once (in order, so that load drifts hit all cells alike)."""
    seen: dict[tuple[str, str, int], list[dict[str, Any]]] = {c: [] for c in cells}
    for r in range(rounds):
        for cell in cells:
            seen[cell].append(meter.p50(*cell))
        print(f"  round {r + 1}/{rounds} done, load {_load()}", flush=True)
    return {c: {"p50_ms": statistics.median(m["p50_ms"] for m in ms),
                "p50s_ms": [m["p50_ms"] for m in ms], "loads": [m["load"] for m in ms]}
            for c, ms in seen.items()}


def gemm_peak_gflops(cpu: int) -> dict[str, Any]:
    """This core's single-thread fp32 GEMM peak: the best of numpy/BLAS matmuls (1 thread)."""
    os.sched_setaffinity(0, {cpu})
    best: dict[int, float] = {}
    for n in (256, 512, 1024, 2048):
        a, b = (np.random.default_rng(n).standard_normal((n, n), dtype=np.float32) for _ in range(2))
        out = np.empty((n, n), np.float32)
        times = []
        for _ in range(max(3, int(2e9 // n ** 3))):
            t = time.perf_counter()
            np.dot(a, b, out=out)
            times.append(time.perf_counter() - t)
        best[n] = 2 * n ** 3 / min(times) / 1e9
    return {"gflops": round(max(best.values()), 2), "by_size": {str(k): round(v, 2) for k, v in best.items()},
            "load": _load()}


# ---------------------------------------------------------------------------- parts


def part_latency(meter: Meter, rounds: int, peak: dict[str, Any], models: list[str]) -> dict[str, Any]:
    summaries = cases.ensure([cases.zoo_spec(m) for m in models], 1)
    cells, info = [], {}
    for model, s in zip(models, summaries):
        for variant, key in (("original", "artifact_original"), ("compressed", "artifact")):
            manifest = json.loads((Path(s[key]) / "manifest.json").read_text())
            info[(model, variant)] = (s[key], manifest["macs"], manifest.get("val_accuracy"))
            has = {rt: (Path(s[key]) / f).exists() for rt, f in OWN_FILES.items()}
            cells += [(s[key], rt, b) for b in BATCHES for rt in RUNTIMES if has.get(rt, True)]
    got = interleaved(meter, cells, rounds)
    gflops = peak["gflops"]
    rows, ratios = [], {}
    for (model, variant), (art, macs, val) in info.items():
        for b in BATCHES:
            floor_ms = 2 * macs * b / (gflops * 1e9) * 1e3
            for rt in RUNTIMES:
                m = got.get((art, rt, b))
                if m is None:
                    continue
                rows.append({"model": model, "variant": variant, "batch": b, "runtime": rt, **m,
                             "macs": macs, "val_accuracy": val, "floor_ms": round(floor_ms, 5),
                             "floor_multiple": round(m["p50_ms"] / floor_ms, 1)})
    p50 = {(r["model"], r["variant"], r["batch"], r["runtime"]): r["p50_ms"] for r in rows}
    for model in models:
        for b in BATCHES:
            for rt in RUNTIMES:
                if (model, "original", b, rt) in p50 and (model, "compressed", b, rt) in p50:
                    ratios.setdefault(model, {}).setdefault(f"batch{b}", {})[rt] = round(
                        p50[(model, "compressed", b, rt)] / p50[(model, "original", b, rt)], 3)
    checks = {
        "numpy_over_onnxruntime_compressed_batch1": {
            m: round(p50[(m, "compressed", 1, "numpy")] / p50[(m, "compressed", 1, "onnxruntime")], 2)
            for m in models},
        "ratio_gap_numpy_vs_onnxruntime": {
            m: {k: round(v["numpy"] - v["onnxruntime"], 3) for k, v in ratios[m].items()} for m in models},
    }
    if "lenet5" in models:
        checks["lenet5_ratio_onnxruntime_batch64"] = ratios["lenet5"]["batch64"]["onnxruntime"]
        checks["lenet5_ratio_onnxruntime_batch1"] = ratios["lenet5"]["batch1"]["onnxruntime"]
    checks["numpy_within_3x_onnxruntime"] = all(
        checks["numpy_over_onnxruntime_compressed_batch1"][m] <= 3 for m in ("deepsense", "bilstm") if m in models)
    checks["ratios_within_0.1"] = all(abs(g) <= 0.1 for v in checks["ratio_gap_numpy_vs_onnxruntime"].values()
                                      for g in v.values())
    profiles = {m: _numpy_profile(info[(m, "compressed")][0], 1, meter.cpu)
                for m in ("deepsense", "bilstm") if m in models}
    return {"peak": peak, "rounds": rounds, "rows": rows, "ratios": ratios, "checks": checks,
            "numpy_profile_compressed_batch1": profiles,
            "compressions": {m: {k: s.get(k) for k in ("kept_params", "accuracy_before", "accuracy_after",
                                                        "artifact", "artifact_original")}
                             for m, s in zip(models, summaries)}}


def _numpy_profile(artifact: str, batch: int, cpu: int, runs: int = 200) -> dict[str, Any]:
    """Where the numpy runtime's time goes (cProfile over ``runs`` runs, thread CPU time): the
    functions by their own time per run, and what one numpy call costs on this core (tanh on
    48 floats, the size of a compressed recurrent layer's gates)."""
    import cProfile
    import pstats
    import timeit

    from deepfleet.device_agent.runtime import load_model

    os.sched_setaffinity(0, {cpu})
    model = load_model(artifact)
    x = np.random.default_rng(0).standard_normal((batch, *model.input_shape), dtype=np.float32)
    for _ in range(10):
        model.run(x)
    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    for _ in range(runs):
        model.run(x)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    a, b = np.ones((1, 48), np.float32), np.empty((1, 48), np.float32)
    call_us = min(timeit.repeat(lambda: np.tanh(a, b), number=20000, repeat=5)) / 20000 * 1e6
    return {"batch": batch, "run_us": round(total / runs * 1e6, 1), "numpy_call_us": round(call_us, 3),
            "functions": [{"function": f"{k[2]} ({Path(k[0]).name}:{k[1]})", "calls_per_run": v[1] / runs,
                           "own_us_per_run": round(v[2] / runs * 1e6, 1)} for k, v in top]}


# What one step of each of the numpy runtime's recurrent loops (runtime._RnnGroup.loop: keyed by
# the loop's name less "_loop_") calls after its matmul: (numpy function, width of its operands
# in units of the group's summed hidden size).
# A step adds its precomputed input projection first when the inputs are not folded in.
_STEP_CALLS = {
    "lstm": (("exp", 3), ("add", 3), ("tanh", 1), ("true_divide", 2), ("add", 1), ("tanh", 1),
             ("true_divide", 1)),
    "gru": (("exp", 3), ("add", 3), ("true_divide", 1), ("add", 1), ("tanh", 1), ("true_divide", 2),
            ("add", 1)),
    "gru_once": (("exp", 2), ("add", 2), ("true_divide", 1), ("add", 1), ("tanh", 1), ("subtract", 1),
                 ("true_divide", 1), ("add", 1)),
}


def _call_us(stmt: str, names: dict[str, Any], repeat: int = 7, number: int = 20000) -> float:
    """Best time of ``stmt`` (source, so that no Python wrapper's call is timed with it)."""
    import timeit

    return min(timeit.repeat(stmt, globals=names, number=number, repeat=repeat)) / number * 1e6


def part_floor(meter: Meter, rounds: int, models: list[str]) -> dict[str, Any]:
    """The numpy runtime's floor on the compressed recurrent models at batch 1: each call one
    loop step makes (the matmul at the group's shape, then the ufuncs of _STEP_CALLS at their
    widths) timed alone on fresh arrays, summed over the steps of every recurrent group, plus
    the time the rest of the model takes (the model's p50 minus its loops' own time). That is
    what the runtime would take if nothing but its numpy calls cost anything; against it, the
    issue's bar (3 x onnxruntime's p50) and the runtime's own p50."""
    from deepfleet.device_agent.runtime import _Rnn, load_model

    os.sched_setaffinity(0, {meter.cpu})
    summaries = cases.ensure([cases.zoo_spec(m) for m in models], 1)
    out = {}
    rng = np.random.default_rng(0)
    for model_name, s in zip(models, summaries):
        art = s["artifact"]
        model = load_model(art)
        x = rng.standard_normal((1, *model.input_shape), dtype=np.float32)
        model.run(x)  # builds the recurrent groups at batch 1
        groups = [g for run, _, _ in model._program if isinstance(run, _Rnn) for g in run.groups.values()
                  if g.key is not None]
        if not groups:
            continue
        rows, floor_us, loops_us = [], 0.0, 0.0
        for g in groups:
            loop = g.loop()
            kind = loop.__name__.removeprefix("_loop_")
            row = np.ones((1, g.R.shape[0]), np.float32)
            gates = np.empty((1, g.R.shape[1]), np.float32)
            calls = [("dot", _call_us("dot(R, gates)", {"dot": row.dot, "R": g.R, "gates": gates}))]
            widths = ([("add", g.n_x)] if not g.fold else []) + list(_STEP_CALLS[kind])
            for name, width in widths:
                a, b = (rng.random((1, width * g.hs), dtype=np.float32) + 0.5 for _ in range(2))
                f = getattr(np, name)
                names = {"f": f, "a": a, "b": b, "c": np.empty_like(a)}
                calls.append((name, _call_us("f(a, b, c)" if f.nin == 2 else "f(a, c)", names)))
            with np.errstate(over="ignore"):
                loop_us = _call_us("loop()", {"loop": loop}, number=200)
            per_step = sum(us for _, us in calls)
            floor_us += len(g.steps) * per_step
            loops_us += loop_us
            rows.append({"kind": kind, "steps": len(g.steps), "hidden": g.hs, "matmul": list(g.R.shape),
                         "inputs_folded": g.fold, "calls": [{"call": n, "us": round(us, 3)} for n, us in calls],
                         "floor_step_us": round(per_step, 3), "loop_us": round(loop_us, 1),
                         "loop_step_us": round(loop_us / len(g.steps), 3)})
        cells = [(art, "numpy", 1), (art, "onnxruntime", 1)]
        got = interleaved(meter, cells, rounds)
        numpy_us, ort_us = (got[c]["p50_ms"] * 1e3 for c in cells)
        rest_us = max(numpy_us - loops_us, 0.0)
        out[model_name] = {
            "groups": rows, "numpy_p50_us": round(numpy_us, 1), "onnxruntime_p50_us": round(ort_us, 1),
            "bar_us": round(3 * ort_us, 1), "loops_us": round(loops_us, 1), "rest_us": round(rest_us, 1),
            "floor_us": round(floor_us + rest_us, 1),
            "floor_over_onnxruntime": round((floor_us + rest_us) / ort_us, 2),
            "numpy_over_onnxruntime": round(numpy_us / ort_us, 2)}
    return {"models": out, "load": _load()}


def _ort_profile(model_onnx: str, batch: int, runs: int = 50) -> list[dict[str, Any]]:
    """onnxruntime's own profile (SessionOptions.enable_profiling), one thread: total and mean
    time per op type over ``runs`` runs, largest first."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        s = ort.InferenceSession(model_onnx, opts, providers=["CPUExecutionProvider"])
        inp = s.get_inputs()[0]
        shape = [batch if not isinstance(d, int) else d for d in inp.shape]
        x = {inp.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
        for _ in range(runs):
            s.run(None, x)
        events = json.loads(Path(s.end_profiling()).read_text())
    per: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per.setdefault(e["args"]["op_name"], []).append(e["dur"])
    total = sum(sum(v) for v in per.values())
    return sorted(({"op": k, "us_per_run": round(sum(v) / runs, 1), "share": round(sum(v) / total, 3),
                    "nodes": len(v) // runs} for k, v in per.items()), key=lambda r: -r["us_per_run"])


def part_int8(meter: Meter, rounds: int) -> dict[str, Any]:
    specs = {**{f"{m} deepiot+fixedpoint8": cases.int8_spec(m) for m in cases.ZOO},
             "lenet5 original fixedpoint8": cases.int8_original_spec("lenet5")}
    summaries = dict(zip(specs, cases.ensure(list(specs.values()), 2)))
    pairs = {label: (s["artifact"], cases.float_twin(s["artifact"])) for label, s in summaries.items()}
    cells = [(a, "onnxruntime", b) for label in pairs for a in pairs[label] for b in BATCHES]
    got = interleaved(meter, cells, rounds)
    rows = []
    for label, (q, f) in pairs.items():
        info = json.loads((Path(q) / "manifest.json").read_text())["onnx"]
        for b in BATCHES:
            qi, fi = got[(q, "onnxruntime", b)], got[(f, "onnxruntime", b)]
            rows.append({"case": label, "batch": b, "int8_p50_ms": qi["p50_ms"], "fp32_p50_ms": fi["p50_ms"],
                         "speedup": round(fi["p50_ms"] / qi["p50_ms"], 2), "int8_p50s_ms": qi["p50s_ms"],
                         "fp32_p50s_ms": fi["p50s_ms"], "loads": qi["loads"], "onnx": info,
                         "val_accuracy": summaries[label].get("val_accuracy_after")})
    q, f = pairs["lenet5 original fixedpoint8"]
    lenet64 = next(r for r in rows if r["case"] == "lenet5 original fixedpoint8" and r["batch"] == 64)
    return {"rounds": rounds, "rows": rows,
            "check_lenet5_original_batch64_speedup_ge_1.5": lenet64["speedup"] >= 1.5,
            "profile_lenet5_original_batch64": {"int8": _ort_profile(str(Path(q) / "model.onnx"), 64),
                                                "fp32": _ort_profile(str(Path(f) / "model.onnx"), 64),
                                                "load": _load()}}


def _pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Labels not dominated in (accuracy: higher is better, p50: lower is better)."""
    return sorted(k for k, (acc, ms) in points.items()
                  if not any(a >= acc and m <= ms and (a > acc or m < ms) for a, m in points.values()))


def part_ranking(meter: Meter, rounds: int, count: int, workers: int) -> dict[str, Any]:
    from scipy.stats import kendalltau

    specs = cases.search_specs(count)
    summaries = cases.ensure(specs, workers)
    cands: dict[str, dict[str, Any]] = {}
    for i, (spec, s) in enumerate(zip(specs, summaries)):
        bits = spec["settings"].get("fixedpoint", {}).get("bits")
        label = f"{spec['model']}#{i} {spec['method']}{bits or ''} {spec['target_params']:.3%}"
        cands[label] = {"model": spec["model"], "artifact": s["artifact"], "val": s["val_accuracy_after"]}
        cands[f"{spec['model']} original"] = {"model": spec["model"], "artifact": s["artifact_original"],
                                              "val": s["val_accuracy_before"]}
    cells = [(c["artifact"], rt, 1) for c in cands.values() for rt in ("numpy", "onnxruntime")]
    got = interleaved(meter, cells, rounds)
    for c in cands.values():
        c.update({rt: got[(c["artifact"], rt, 1)]["p50_ms"] for rt in ("numpy", "onnxruntime")})
    out: dict[str, Any] = {"rounds": rounds, "batch": 1, "candidates": cands}
    for scope in ("all", "lenet5", "mlp"):
        sel = {k: c for k, c in cands.items() if scope == "all" or c["model"] == scope}
        tau = kendalltau([c["numpy"] for c in sel.values()], [c["onnxruntime"] for c in sel.values()])
        entry: dict[str, Any] = {"n": len(sel), "kendall_tau": round(float(tau.statistic), 3),
                                 "p_value": float(tau.pvalue)}
        if scope != "all":
            fronts = {rt: _pareto({k: (c["val"], c[rt]) for k, c in sel.items()}) for rt in ("numpy", "onnxruntime")}
            entry.update(pareto=fronts, pareto_same=fronts["numpy"] == fronts["onnxruntime"])
        out[scope] = entry
    return out


_MEMORY_SCRIPT = r"""
import importlib.util, json, sys
agent_path, backend, artifact = sys.argv[1:4]


def status(key):  # kB, from /proc: this process's own memory since its exec
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])


spec = importlib.util.spec_from_file_location("agent", agent_path)  # the shipped file
agent = importlib.util.module_from_spec(spec)
spec.loader.exec_module(agent)
agent.import_runtime(backend)  # the runtime's own memory is not the model's
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
inst = agent.ModelCache().get(artifact, backend)[0]
out = {"baseline_mb": base / 1024}
for batch in (1, 64):
    x = inst.prepare(agent.make_input(inst.input_shape, batch, 0))
    for _ in range(5):
        inst.run(x)
    out["batch%d_mb" % batch] = (status("VmHWM") - base) / 1024
print(json.dumps(out))
"""


def part_memory() -> dict[str, Any]:
    from deepfleet.device_agent import bundle

    agent_path = str(bundle.agent_file())
    summaries = cases.ensure([cases.zoo_spec(m) for m in cases.ZOO], 1)
    rows = []
    for model, s in zip(cases.ZOO, summaries):
        for variant, key in (("original", "artifact_original"), ("compressed", "artifact")):
            for rt in RUNTIMES:
                if rt in OWN_FILES and not (Path(s[key]) / OWN_FILES[rt]).exists():
                    continue
                r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, agent_path, rt, s[key]],
                                   capture_output=True, text=True, check=True, env=os.environ)
                m = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append({"model": model, "variant": variant, "runtime": rt,
                             **{k: round(v, 2) for k, v in m.items()}})
    by = {(r["model"], r["variant"], r["runtime"]): r for r in rows}
    ratios = {m: {rt: {f"batch{b}": round(by[(m, "compressed", rt)][f"batch{b}_mb"]
                                         / max(by[(m, "original", rt)][f"batch{b}_mb"], 1e-3), 3)
                       for b in BATCHES}
                  for rt in RUNTIMES if (m, "original", rt) in by and (m, "compressed", rt) in by}
              for m in cases.ZOO}
    return {"method": "peak resident memory added by loading the artifact through the shipped "
                      "agent's ModelCache and 5 runs at batch 1, then at batch 64: VmHWM (reset "
                      "through /proc/self/clear_refs after the imports) minus VmRSS after importing "
                      "the runtime; one fresh process per (model, runtime). Not ru_maxrss: Linux "
                      "keeps it across fork and exec, so a child reports the benchmark's own peak. "
                      "Measured here because the agent does not report peak memory yet",
            "rows": rows, "ratios_compressed_over_original": ratios, "load": _load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    parser.add_argument("--cpu", type=int, default=None, help="the CPU to pin to (default: the last)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.5, help="min_seconds of each measurement")
    parser.add_argument("--workers", type=int, default=2, help="processes for compressions not cached")
    parser.add_argument("--candidates", type=int, default=40, help="search-like candidates to rank")
    parser.add_argument("--smoke", action="store_true",
                        help="quick compressions, short timings, results in a temporary file: "
                             "checks that the benchmark runs")
    parser.add_argument("--models", default=",".join(cases.ZOO),
                        help="comma list of the latency part's models (default: all of " + ", ".join(cases.ZOO) + ")")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        cases.SMOKE = True
        args.rounds, args.seconds, args.candidates = 1, 0.05, min(args.candidates, 4)
    out = args.out or (Path(tempfile.gettempdir()) / "runtimes-smoke.json" if args.smoke else DEFAULT_OUT)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; accepted: {', '.join(PARTS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - set(cases.ZOO):
        parser.error(f"--models {args.models!r}: give a comma list from {', '.join(cases.ZOO)}")
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    if "compress" in parts:
        specs = ([cases.zoo_spec(m) for m in cases.ZOO] + [cases.int8_spec(m) for m in cases.ZOO]
                 + [cases.int8_original_spec("lenet5")] + cases.search_specs(args.candidates))
        cases.ensure(specs, args.workers)
    meter = Meter(cpu, args.seconds) if set(parts) & {"latency", "int8", "ranking", "floor"} else None
    machine = {"cpu": cpu, "cpu_count": os.cpu_count(), "numpy": np.__version__, "load_at_start": _load()}
    for part in parts:
        t0 = time.perf_counter()
        if part == "compress":
            continue
        print(f"{part}: load {_load()}", flush=True)
        if part == "latency":
            assert meter is not None
            result = part_latency(meter, args.rounds, gemm_peak_gflops(cpu), models)
        elif part == "int8":
            assert meter is not None
            result = part_int8(meter, args.rounds)
        elif part == "ranking":
            assert meter is not None
            result = part_ranking(meter, args.rounds, args.candidates, args.workers)
        elif part == "floor":
            assert meter is not None
            result = part_floor(meter, args.rounds, [m for m in models if m in ("deepsense", "bilstm")])
        else:
            result = part_memory()
        result = {**result, "seconds": round(time.perf_counter() - t0, 1), "load_at_end": _load(),
                  "run_machine": machine}
        print(json.dumps({part: {k: v for k, v in result.items() if k not in ("rows", "candidates")}}, indent=1))
        save_case(out, part, result)


if __name__ == "__main__":
    main()

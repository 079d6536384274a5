"""How good is the search's latency predictor? Build many distinct candidates, measure them on
real devices, and score each predictor on candidates it has not seen.

Three steps (``--steps build,measure,evaluate``, default all):

* **build**: ``--candidates`` distinct artifacts of the zoo families lenet5, mlp, vgg (digits)
  and deepsense, bilstm (sensing), shaped as DeepIoT returns them: every prunable group keeps a
  random share of its units (log-uniform 2-100 %, drawn per group), then the extracted dense
  model; a third of them also go through 8-bit fixed point (int8 QDQ on onnxruntime). Weights
  are the untrained model's: latency depends on the structure, not on what was learnt, and
  training 200 models would take hours. Each artifact carries its features
  (:func:`deepfleet.features.artifact_features`).
* **measure**: every artifact on every device of ``--fleet`` (default the local device), the
  runtime chosen by the agent (``backend: auto`` where the agent has it; ``--backend`` picks
  one, e.g. ``numpy`` on the local device for a second class of edison's runtime), pinned to one core,
  one device after another (the sandbox devices share this machine's cores: measured together,
  two devices pinned to core 0 timed each other's work), rows written to ``OUT/results``; a
  tenth of the artifacts measured twice gives the measurement's own repeat noise (pooled, and
  per class with the share of repeats more than 10 % apart), the floor no predictor can beat.
  ``--passes N`` (default 5) measures every artifact in each of N passes over all of them
  instead, a point being the median of its passes: this shared host drifts by 5-10 % within
  minutes (a second pass a minute after the first ran that much faster in CPU time), and a
  median over passes minutes apart is a steadier truth to score against; the repeat noise is
  then the first two passes' of every artifact. ``measure`` run again on the same ``--out``
  adds passes (a point is the median of all an artifact's rows on its device and backend).
  Scored against 5 passes the hybrid had 95.8 % of held-out candidates within 10 % on edison
  and 93.3 % on local numpy, against 3 passes 90.6 and 92.6 %, against 1 pass 78-82 % and
  92-93 % (benchmarks/results/predictor*.json).
* **evaluate**: per device (class) and backend, for each predictor (``linear``, ``kernel``,
  ``forest``, ``hybrid``): share of held-out candidates within ±10 % and ±20 % of measured p50,
  MAPE and Spearman, by random split (5 seeds, 20 % held out) and by leaving one model family
  out; a learning curve over 10, 20, 50 and 100 training measurements (:data:`DRAWS` random
  draws each, averaged), fitted on the class's own points alone and as the judge fits with the
  fleet's other classes measured (``learning_curve_fleet``: own, borrowed or transferred,
  whichever has the lower held-out error; with the share within 10 % per family, where the
  error comes from); cold start on each class from 10 of its own measurements borrowing from
  the others (:data:`DRAWS` draws); false rejections when the judge's rule is replayed against
  a limit at each class's median p50; fit + predict time at 1,000 rows.

Results: ``benchmarks/results/predictor.json`` (and the rows under ``OUT``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# learning-curve and cold-start draws averaged: one draw of 50 points moved the share within
# 10 % by several points (86-88 % in one draw, 91 % over six, on the onnxruntime classes), and
# five draws by up to 3 (edison, 5 passes, before the loop features: draws 0-4 90.0 %, 0-19
# 87.4 %, single draws 79-96 %)
DRAWS = 20
FAMILIES = {"lenet5": "digits", "mlp": "digits", "vgg": "digits", "deepsense": "sensing", "bilstm": "sensing"}


def build(out: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` distinct artifacts under ``out/artifacts``; returns their descriptions."""
    import torch

    from deepfleet.api import export_artifact
    from deepfleet.compressors import Context, make_compressor, run_pipeline
    from deepfleet.compressors._extract import extract
    from deepfleet.compressors._graph import analyse
    from deepfleet.compressors.training import TrainConfig
    from deepfleet.data import load_data
    from deepfleet.features import artifact_features
    from deepfleet.models import build_model

    rng = random.Random(seed)
    torch.manual_seed(seed)
    data = {name: load_data(name) for name in set(FAMILIES.values())}
    made: dict[str, dict[str, Any]] = {}
    tries = 0
    while len(made) < n and tries < 5 * n:
        tries += 1
        family = list(FAMILIES)[len(made) % len(FAMILIES)]
        ds = data[FAMILIES[family]]
        base = build_model(family, input_shape=ds.input_shape, num_classes=ds.num_classes).eval()
        st = analyse(base, torch.as_tensor(ds.X_train[:2]))
        keep = []
        for g in st.groups:
            share = math.exp(rng.uniform(math.log(0.02), 0.0))
            mask = np.zeros(g.size, bool)
            mask[rng.sample(range(g.size), max(1, round(share * g.size)))] = True
            keep.append(mask)
        small = extract(st, st.graph_module, keep).eval()
        quantised = rng.random() < 1 / 3
        method = "random-units"
        if quantised:
            fp = make_compressor("fixedpoint", {"bits": 8, "act_bits": 8, "epochs": 0})
            small = run_pipeline(small, ds, [fp], ctx=Context(finetune=TrainConfig(epochs=0))).model.eval()
            method += "+fixedpoint8"
        _, files = export_artifact(small, model=family, data=ds, seed=seed, compressor={"methods": [method]},
                                   val_accuracy=0.0)
        if files.digest in made:
            continue
        from deepfleet.artifact import save_artifact

        art = save_artifact(out / "artifacts", files)
        made[files.digest] = {"artifact": str(art.path), "family": family, "method": method,
                              "features": artifact_features(files.files)}
        print(f"built {len(made)}/{n}: {family} {method} macs {made[files.digest]['features']['macs']:.0f}",
              flush=True)
    (out / "candidates.json").write_text(json.dumps(made, indent=1))
    return list(made.values())


def measure(out: Path, fleet: str | None, repeat_share: float, backend: str, passes: int) -> None:
    """Every built artifact on every device of ``fleet`` in ``backend``, one device after
    another; rows under ``out/results``. With ``passes`` > 1 every artifact is measured in each
    of that many passes over all of them (minutes apart), else a ``repeat_share`` of them twice."""
    from deepfleet.orchestrator.fleet import load_fleet, local_fleet
    from deepfleet.orchestrator.measure import MeasureSettings, measure_many

    made = json.loads((out / "candidates.json").read_text())
    devices = list(load_fleet(fleet).devices if fleet else local_fleet().devices)
    devices = [d for d in devices if "qemu" not in (d.simulated or "")]  # emulated: no timings
    arts = [m["artifact"] for m in made.values()]
    todo = arts * passes if passes > 1 else arts + arts[: max(2, int(repeat_share * len(arts)))]
    request = {"warmup": 5, "min_runs": 20, "min_seconds": 0.3, "max_seconds": 5.0, "threads": 1,
               "cpus": [0], "ci_target": 0.03, "backend": backend}
    settings = MeasureSettings(request=request, reference_every=0)
    t0 = time.time()
    # one device after another: sandbox devices share this machine's cores, and two devices
    # pinned to the same core at once would time each other's work
    outcomes = [o for d in devices for o in measure_many([d], todo, results_root=out / "results",
                                                          settings=settings, study="predictor")]
    failed = [o for o in outcomes if not o.ok]
    print(f"measured {len(outcomes) - len(failed)} of {len(outcomes)} in {time.time() - t0:.0f} s; "
          f"{len(failed)} failed" + (f": {failed[0].error}" if failed else ""), flush=True)


def _points(out: Path) -> tuple[dict[tuple[str, str], list[dict[str, float]]], float,
                                dict[tuple[str, str], dict[str, float]]]:
    """{(device, backend): one point per artifact}, the repeat noise (median relative
    difference between an artifact's two measurements on one device) and the same per class,
    with the share of repeats that differ by more than 10 %: a class's floor for the share
    within 10 % that a predictor can reach."""
    from deepfleet.artifact import artifact_files
    from deepfleet.features import artifact_features, complete
    from deepfleet.orchestrator.results import plain_rows, read_results

    made = json.loads((out / "candidates.json").read_text())
    for c in made.values():  # built before the loop features: computed from the artifact now
        if not complete(c["features"]):
            path = Path(c["artifact"])
            c["features"] = artifact_features({f: (path / f).read_bytes() for f in artifact_files(path)})
    rows = [r for r in plain_rows(read_results(out / "results", study="predictor"))
            if not r.get("error") and r["artifact_hash"] in made]
    by: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        by.setdefault((r["device"], str(r.get("backend")), r["artifact_hash"]), []).append(float(r["p50_ms"]))
    diffs: dict[tuple[str, str], list[float]] = {}
    for (device, backend, _), v in by.items():
        if len(v) >= 2:
            diffs.setdefault((device, backend), []).append(abs(v[0] - v[1]) / min(v[:2]))
    noise = [d for ds in diffs.values() for d in ds]
    per_class = {k: {"median": round(statistics.median(ds), 4), "over_10pct": round(float(np.mean(np.array(ds) > 0.10)), 4),
                     "repeats": len(ds)} for k, ds in diffs.items()}
    points: dict[tuple[str, str], list[dict[str, float]]] = {}
    for (device, backend, h), values in by.items():
        points.setdefault((device, backend), []).append(
            {**made[h]["features"], "batch": 1.0, "value": statistics.median(values),
             "family": made[h]["family"], "method": made[h]["method"]})  # type: ignore[dict-item]
    return points, (statistics.median(noise) if noise else math.nan), per_class


def _draw(pts: list[dict[str, Any]], n: int, draw: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Draw ``draw`` of a learning curve: ``n`` random points to fit on, the rest held out."""
    order = pts[:]
    random.Random(1000 * n + draw).shuffle(order)
    return order[:n], order[n:]


def _score(kind: str, train: list[dict[str, Any]], test: list[dict[str, Any]],
           others: dict[str, list[dict[str, Any]]] | None = None, by_family: bool = False) -> dict[str, float]:
    """Held-out scores; with ``by_family`` also the share within 10 % per family
    (``within10_<family>``): where the error comes from."""
    from scipy.stats import spearmanr

    from deepfleet.search._predictor import PREDICTORS, fit_class

    if others is None:
        model = PREDICTORS[kind]().fit(train, np.array([p["value"] for p in train]))
        pred = model.predict(test)
    else:
        f = fit_class(kind, train, others)
        pred = np.array([f.predict(p) for p in test]) if f else np.full(len(test), np.nan)
    y = np.array([p["value"] for p in test])
    rel = np.abs(pred - y) / y
    rho = spearmanr(pred, y).statistic if len(y) > 2 else math.nan
    out = {"within10": float(np.mean(rel <= 0.10)), "within20": float(np.mean(rel <= 0.20)),
           "mape": float(np.mean(rel)), "spearman": float(rho), "n_test": len(y)}
    if by_family:
        families = np.array([p["family"] for p in test])
        out.update({f"within10_{fam}": float(np.mean(rel[families == fam] <= 0.10)) if np.any(families == fam)
                    else math.nan for fam in FAMILIES})
    return out


def _mean(scores: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.nanmean([s[k] for s in scores])), 4) for k in scores[0]}


def evaluate(out: Path) -> dict[str, Any]:
    from deepfleet.search._predictor import PREDICTORS, fit_class, margin_for

    points, noise, class_noise = _points(out)
    result: dict[str, Any] = {"repeat_noise_median": round(noise, 4), "classes": {}}
    for (device, backend), pts in sorted(points.items()):
        res: dict[str, Any] = {"points": len(pts), "repeat_noise": class_noise.get((device, backend))}
        # as the judge borrows: from the classes measured in the same runtime when there are such
        others = {f"{d}/{b}": p for (d, b), p in points.items() if d != device and b == backend} or {
            f"{d}/{b}": p for (d, b), p in points.items() if (d, b) != (device, backend)}
        for kind in PREDICTORS:
            split = []
            for s in range(5):
                order = pts[:]
                random.Random(s).shuffle(order)
                cut = int(0.8 * len(order))
                split.append(_score(kind, order[:cut], order[cut:]))
            lofo = {fam: _score(kind, [p for p in pts if p["family"] != fam], [p for p in pts if p["family"] == fam])
                    for fam in FAMILIES if any(p["family"] == fam for p in pts)}
            curve, fleet = {}, {}
            for n in (10, 20, 50, 100):
                if n < len(pts) - 5:
                    draws = [_draw(pts, n, d) for d in range(DRAWS)]
                    curve[str(n)] = _mean([_score(kind, train, test) for train, test in draws])
                    if others:  # as the judge fits: own, borrowed or transferred, by held-out error
                        fleet[str(n)] = _mean([_score(kind, train, test, others, by_family=True)
                                               for train, test in draws])
            cold = None
            if others:
                cold = _mean([_score(kind, *_draw(pts, 10, d), others) for d in range(DRAWS)])
            res[kind] = {"random_split": _mean(split), "leave_family_out": lofo, "learning_curve": curve,
                         "learning_curve_fleet": fleet,
                         "cold_start_10": cold, "false_rejections": _false_rejections(kind, pts, margin_for, fit_class),
                         "false_rejections_fleet": _false_rejections(kind, pts, margin_for, fit_class, others),
                         "fit_predict_ms_1000_rows": _timing(kind, pts)}
        result["classes"][f"{device}/{backend}"] = res
        print(json.dumps({f"{device}/{backend}": {k: res[k]["random_split"] for k in PREDICTORS}}), flush=True)
    return result


def _false_rejections(kind: str, pts: list[dict[str, Any]], margin_for: Any, fit_class: Any,
                      others: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """The judge's rule replayed: for each candidate, a predictor fitted on the others (5-fold;
    with ``others``, the other classes' points too, as the judge passes them), a limit at the
    class's median p50; a rejection is false when the measured value holds."""
    limit = statistics.median(p["value"] for p in pts)
    rejected = false = 0
    order = pts[:]
    random.Random(2).shuffle(order)
    for k in range(5):
        train = [p for i, p in enumerate(order) if i % 5 != k]
        f = fit_class(kind, train, others)
        if f is None:
            continue
        for p in (p for i, p in enumerate(order) if i % 5 == k):
            if f.predict(p) > limit * (1 + margin_for(f.error)):
                rejected += 1
                false += int(p["value"] <= limit)
    return {"limit_ms": round(limit, 5), "rejected": rejected, "false": false,
            "false_share": round(false / rejected, 4) if rejected else None}


def _timing(kind: str, pts: list[dict[str, Any]]) -> float:
    """Fit + one prediction on 1,000 rows (the points resampled with 2 % noise), ms."""
    from deepfleet.search._predictor import PREDICTORS

    rng = np.random.default_rng(0)
    rows = [dict(pts[i], value=pts[i]["value"] * (1 + 0.02 * rng.standard_normal()))
            for i in rng.integers(0, len(pts), 1000)]
    t0 = time.perf_counter()
    model = PREDICTORS[kind]().fit(rows, np.array([r["value"] for r in rows]))
    model.predict(rows[:1])
    return round(1000 * (time.perf_counter() - t0), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="build,measure,evaluate")
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--fleet", default=None, help="fleet file (default: the local device)")
    ap.add_argument("--backend", default="auto",
                    help="the measure step's runtime (default auto); e.g. numpy on the local device gives "
                         "edison's numpy class another class of its runtime to learn from")
    ap.add_argument("--passes", type=int, default=5,
                    help="measure every artifact in this many passes over all of them; a point is the "
                         "median of its passes (default 5; 1: one pass, a tenth measured twice for the "
                         "repeat noise)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "predictor")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, default=HERE / "results" / "predictor.json")
    args = ap.parse_args()
    if args.passes < 1:
        ap.error(f"--passes must be at least 1 (passes over all candidates), got {args.passes}")
    steps = args.steps.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    if "build" in steps:
        build(args.out, args.candidates, args.seed)
    if "measure" in steps:
        measure(args.out, args.fleet, 0.1, args.backend, args.passes)
    if "evaluate" in steps:
        result = evaluate(args.out)
        result["load_1m"] = os.getloadavg()[0]
        result["candidates"] = args.candidates
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(result, indent=1, sort_keys=True))
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()

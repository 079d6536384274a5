"""From validated run data to a :class:`Report`: tables, figures and notes in sections.

This is the one place that decides what the report contains; renderers (HTML, Markdown, CSV)
only lay it out. Nothing here reads or writes files.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from deepfleet.device_agent.protocol import ESTIMATE_BASIS
from deepfleet.report import _plots, _tables
from deepfleet.report._analysis import (
    CHOSEN_RULE,
    DEFAULT_MAX_DROP_PP,
    ENERGY_COLUMNS,
    candidate_frame,
    choose,
    class_metrics,
    device_metrics,
    ok_rows,
    pareto_points,
)
from deepfleet.report._format import paper_table1
from deepfleet.report._load import RunData

__all__ = ["FOCUS_LIMIT", "Figure", "Report", "Section", "Table", "build", "max_drop"]

FOCUS_LIMIT = 6  # artifacts per class in the latency section when nothing was chosen


@dataclass(frozen=True)
class Table:
    name: str  # also the CSV file name (``<name>.csv``)
    caption: str
    frame: pd.DataFrame
    html_rows: int = 40  # the HTML shows this many rows; the CSV always has all
    csv: bool = True  # False: a text view of another table (which has the CSV)
    # The page shows the table transposed: one column per row, named by these columns' values,
    # one row per other column (a few rows of many columns fit a window that way); CSV as is.
    transpose_by: tuple[str, ...] = ()
    # The columns the page and the Markdown summary show, in this order (empty: all); the CSV
    # keeps every column. For tables whose full width would need a horizontal scroll bar.
    shown: tuple[str, ...] = ()

    def page_frame(self) -> pd.DataFrame:
        """The frame as the page shows it: :attr:`shown` columns that exist, else all."""
        if not self.shown:
            return self.frame
        return self.frame[[c for c in self.shown if c in self.frame.columns]]


@dataclass(frozen=True)
class Figure:
    title: str
    png: bytes
    caption: str = ""


@dataclass(frozen=True)
class Section:
    key: str  # HTML anchor
    title: str
    notes: list[str] = field(default_factory=list)  # paragraphs (plain text)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    study: str
    source: str  # the run directory
    generated_at: str
    max_drop_pp: float
    max_drop_source: str  # where max_drop_pp came from (--max-drop, the study, the default)
    facts: dict[str, str]  # overview lines: label -> value
    absent: list[str]  # what could not be shown, and why
    sections: list[Section]
    csv_only: list[Table]  # tables too big or too raw for the page (written as CSV only)

    @property
    def tables(self) -> list[Table]:
        return [t for s in self.sections for t in s.tables] + self.csv_only

    @property
    def figures(self) -> list[Figure]:
        return [f for s in self.sections for f in s.figures]


def _choices(run: RunData, per_class: pd.DataFrame, classes: list[str], max_drop: float
             ) -> tuple[list[dict[str, Any]], pd.DataFrame | None]:
    """One entry per (model, class) with its baseline, chosen point, reason and Pareto points."""
    if run.candidates is None:
        return [], None
    cands = candidate_frame(run.candidates)
    entries = []
    for model in sorted(set(cands["model_key"])):
        base_rows = cands.loc[(cands["kind"] == "baseline") & (cands["model_key"] == model)]
        for cls in classes:
            baseline = None
            if not base_rows.empty:
                b = base_rows.iloc[0].to_dict()
                m = per_class.loc[(per_class["device_class"] == cls)
                                  & (per_class["artifact_hash"] == b["artifact_hash"])]
                b.update(m.iloc[0].to_dict() if len(m) else
                         {c: math.nan for c in ["p50_ms", *ENERGY_COLUMNS.values()]})
                baseline = b
            mine, runtime_note = _one_runtime(per_class, cls, baseline)
            pts = pareto_points(cands, mine, cls, model)
            chosen, reason = choose(pts, max_drop)
            if runtime_note:
                reason += runtime_note
            if baseline is not None and isinstance(baseline.get("backend_note"), str):
                reason += f"; the original has no class value: {baseline['backend_note']}"
            elif baseline is None or math.isnan(float(baseline.get("p50_ms", math.nan))):
                reason += "; the original model was not measured on this class"
            entries.append({"model": model or "(unnamed)", "model_key": model, "device_class": cls,
                            "baseline": baseline, "chosen": chosen, "reason": reason,
                            "points": pts})
    return entries, cands


def _one_runtime(per_class: pd.DataFrame, cls: str, baseline: dict[str, Any] | None
                 ) -> tuple[pd.DataFrame, str]:
    """The class values of ``cls`` in ONE runtime (candidates are never ranked across
    runtimes): the baseline's when it has one, else the most common; and a note on what was
    left out (artifacts in another runtime, or whose devices ran several)."""
    rows = per_class.loc[per_class["device_class"] == cls]
    single = rows.loc[~rows["backend"].astype(str).str.startswith("mixed")]
    counts = single["backend"].value_counts()
    if counts.empty:
        return rows.iloc[0:0], ""
    base = (baseline or {}).get("backend")
    runtime = base if isinstance(base, str) and base in counts.index else str(counts.index[0])
    keep = single.loc[single["backend"] == runtime]
    left = len(rows) - len(keep)
    note = (f"; {left} artifact(s) measured on this class in another runtime than {runtime}, or in "
            "several, left out (runtimes are never compared)") if left else ""
    return keep, note


def _labels(results: pd.DataFrame) -> dict[str, str]:
    """hash -> 'model/compressor hash8' from the rows, for artifacts no candidate names."""
    first = results.groupby("artifact_hash")[["model_name", "compressor"]].first()
    return {h: "/".join(str(v) for v in (m, c) if isinstance(v, str)) + f" {h[:8]}"
            for h, m, c in zip(first.index, first["model_name"], first["compressor"])}


def _roles(entries: list[dict[str, Any]], per_device: pd.DataFrame, labels: dict[str, str]
           ) -> tuple[dict[str, str], str | None]:
    """hash -> role label for the artifacts the latency section focuses on, and a note when
    they had to be picked by how often they were measured (nothing was chosen)."""
    roles: dict[str, str] = {}
    for e in entries:
        if e["baseline"] is not None and e["baseline"].get("artifact_hash"):
            roles[e["baseline"]["artifact_hash"]] = "original"
    chosen: dict[str, list[str]] = {}
    for e in entries:
        if e["chosen"] is not None:
            chosen.setdefault(e["chosen"]["artifact_hash"], []).append(e["device_class"])
    for h, classes in chosen.items():
        roles[h] = "chosen@" + ",".join(classes)
    if chosen:
        return roles, None
    # Nothing chosen (a measure run): the most-measured artifacts of each class.
    note = None
    for _, g in per_device.groupby("device_class", sort=True):
        counts = g.groupby("artifact_hash")["rows"].sum().sort_values(ascending=False, kind="stable")
        for h in counts.index[:FOCUS_LIMIT]:
            roles.setdefault(h, labels.get(h, f"artifact {h[:8]}").strip())
        if len(counts) > FOCUS_LIMIT:
            note = (f"no chosen candidate: showing the {FOCUS_LIMIT} most-measured artifacts of "
                    "each class (all artifacts are in the artifacts table and CSV files)")
    return roles, note


def _facts(run: RunData, classes: list[str]) -> dict[str, str]:
    r = run.results
    ok = r["error"].isna()
    ref = r["reference"].fillna(False).astype(bool)
    facts = {
        "study": run.study,
        "run directory": str(run.located.run),
        "measurement rows": f"{len(r):,} ({int((ok & ~ref).sum()):,} ok, "
                            f"{int((~ok).sum()):,} failed, {int((ok & ref).sum()):,} drift checks)",
        "devices": f"{r['device'].nunique()} in {len(classes)} class(es): {', '.join(classes)}",
        "artifacts measured": f"{r['artifact_hash'].nunique():,}",
        "measured between": f"{r['started_at'].min():%Y-%m-%d %H:%M} and "
                            f"{r['started_at'].max():%Y-%m-%d %H:%M} UTC",
        "runtimes": ", ".join(
            f"{b} ({n:,} rows)" for b, n in r.loc[ok & ~ref, "backend"].fillna("unknown").value_counts().sort_index().items())
        or "none",
        "energy kinds present": ", ".join(
            f"{k} ({n:,} rows)" for k, n in r.loc[ok, "energy_kind"].value_counts().sort_index().items())
        or "none",
    }
    if run.candidates is not None:
        c = run.candidates
        facts["candidates"] = (f"{int((c['kind'] == 'candidate').sum()):,} trials "
                               f"({', '.join(f'{k}: {n}' for k, n in c['outcome'].value_counts().sort_index().items())})")
    return facts


def max_drop(given: float | None, limits: dict[str, float]) -> tuple[float, str]:
    """The accuracy-drop limit for choosing, and where it comes from: ``given`` (--max-drop)
    wins; else the study's own ``accuracy_drop_pp`` constraint (its max; the strictest when
    the candidates name several); else DEFAULT_MAX_DROP_PP."""
    where = "the candidates' constraints"
    if given is not None:
        source = "--max-drop"
        if limits and given > min(limits.values()):
            label = min(limits, key=limits.__getitem__)
            source += (f" (larger drops still break the study's constraint {label}: those "
                       "candidates are infeasible)")
        return given, source
    if not limits:
        return DEFAULT_MAX_DROP_PP, ("the default: the study has no accuracy_drop_pp constraint"
                                     f" in {where}")
    label = min(limits, key=limits.__getitem__)
    others = f"; the strictest of {', '.join(sorted(limits))}" if len(limits) > 1 else ""
    return limits[label], f"the study's constraint {label} ({where}{others})"


def build(run: RunData, *, max_drop_pp: float | None = None) -> Report:
    """The whole report for ``run``. ``max_drop_pp`` is the accuracy-drop limit for choosing;
    None takes it from the study (see :func:`max_drop`)."""
    max_drop_pp, max_drop_source = max_drop(max_drop_pp, run.drop_limits)
    results = run.results
    per_device = device_metrics(results)
    per_class = class_metrics(per_device)
    ok = ok_rows(results)  # filtered once: it copies every row's latency list
    classes = sorted(set(ok["device_class"]))
    absent = list(run.absent)
    entries, cands = _choices(run, per_class, classes, max_drop_pp)
    roles, focus_note = _roles(entries, per_device, _labels(results))
    chosen_by_class = {e["device_class"]: (e["chosen"] or {}).get("artifact_hash") for e in entries}
    sections = [
        _table1_section(entries, max_drop_pp, absent),
        _pareto_section(entries, max_drop_pp),
        _latency_section(ok, roles, per_device, focus_note),
        _variation_section(results, per_device, roles, absent),
        _ranking_section(per_class, chosen_by_class, classes, absent),
        _layers_section(entries),
        _objectives_section(cands, entries, per_class),
        _provenance_section(run, roles, absent),
    ]
    csv_only = [Table("per_class_metrics", "class values of every artifact", per_class),
                Table("per_device_metrics", "device values of every artifact", per_device)]
    if entries:
        frames = [e["points"].assign(device_class=e["device_class"]) for e in entries]
        # the columns even when no candidate was measured on any class
        pts = pd.concat([f for f in frames if not f.empty] or frames[:1], ignore_index=True)
        csv_only.append(Table("pareto_points", "candidates with their class metrics", pts))
    if not (ok["energy_kind"] == "measured").any():
        absent.append("no measured energy: energy numbers are simulated or operation-count "
                      "estimates only, labelled so everywhere")
    return Report(study=run.study, source=str(run.located.run),
                  generated_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  max_drop_pp=max_drop_pp, max_drop_source=max_drop_source,
                  facts=_facts(run, classes), absent=absent,
                  sections=[s for s in sections if s is not None], csv_only=csv_only)


def _table1_section(entries: list[dict[str, Any]], max_drop: float, absent: list[str]) -> Section:
    notes = [CHOSEN_RULE.replace("MAX_DROP", f"{max_drop:g}"),
             "Original = the study's baseline candidate (the uncompressed model). Latency is the "
             "class p50 per run of batch samples (batch 1: one inference); energy is per run too, one column per kind "
             "(measured, simulated, estimated from operation counts, time-estimated from busy time x the device's "
             "stated power): kinds are never combined. Each class's candidates are compared in one runtime (the "
             "original's); a class value exists only when the class's devices all ran that runtime."]
    if not entries:
        return Section("table1", "Table 1: original vs compressed", notes=[
            "Not available: it needs the candidates table of a search (the baseline row is the "
            "original model, the chosen candidate the compressed one)."])
    frame = _tables.table1(entries)
    if frame["chosen_artifact"].isna().all():
        absent.append(f"no candidate qualifies as chosen on any class (limit {max_drop:g} pp)")
    return Section("table1", "Table 1: original vs compressed (per model and device class)",
                   notes=notes, tables=[
                       Table("table1_paper", "original → compressed (reduction), as in DeepIoT's "
                             "Table 1", paper_table1(frame), csv=False),
                       Table("table1", "the same numbers, one row each (one column each in "
                             "the CSV file)", frame, transpose_by=("model", "device_class"))])


def _pareto_section(entries: list[dict[str, Any]], max_drop: float) -> Section | None:
    if not entries:
        return None
    figures = []
    for e in entries:
        if e["points"].empty:
            continue
        base = e["baseline"]
        floor = None
        if base is not None and not pd.isna(base.get("accuracy_val")):
            floor = float(base["accuracy_val"]) - max_drop / 100.0
        png = _plots.pareto_png(e["points"], title=f"{e['model']} on {e['device_class']}",
                                baseline=base, chosen=e["chosen"], accuracy_floor=floor)
        chosen = e["chosen"]
        caption = (f"chosen: trial {chosen['trial']} ({chosen['artifact_hash'][:12]}…)"
                   if chosen is not None else f"nothing chosen: {e['reason']}")
        figures.append(Figure(f"{e['model']} on {e['device_class']}", png, caption))
    return Section("pareto", "Pareto fronts per device class", notes=[
        "Each point is a candidate measured on the class (class p50 latency; energy per kind in "
        "its own panel). The red line is the Pareto front of the feasible candidates; the black "
        "star is the original model, the red ring the chosen candidate; the dashed line is the "
        f"accuracy limit ({max_drop:g} pp below the original, validation split)."],
        figures=figures)


# The headline columns of the latency table; the box-plot quantiles (q1, q3, p1), mean, row
# count and batch are in its CSV and the figures (all of them: 1500 px wide at 1400 px).
_LATENCY_SHOWN = ("device_class", "device", "backend", "role", "runs", "p50_ms", "p90_ms",
                  "p99_ms", "cpu_p50_ms", "init_ms", "memory_peak_mb", "energy_measured_mj",
                  "energy_simulated_mj", "energy_estimated_mj", "energy_time_estimated_mj")


def _latency_section(ok: pd.DataFrame, roles: dict[str, str], per_device: pd.DataFrame,
                     note: str | None) -> Section:
    table = _tables.latency_table(ok, roles, per_device)
    notes = ["Percentiles of every timed run, pooled over each device's successful rows of the "
             "artifact in one runtime (backend; drift checks excluded): rows of two runtimes are "
             "never pooled. cpu_p50_ms is the measuring thread's CPU time per run, init_ms the "
             "model load, memory_peak_mb the peak resident memory of loading and running it (MiB "
             "above the agent's own; docs/measurement.md). Energy columns are medians per kind."]
    if note:
        notes.append(note)
    figures = []
    if not table.empty:
        for cls, g in table.groupby("device_class", sort=True):
            figures.append(Figure(f"latency distribution on {cls}",
                                  _plots.latency_box_png(g, title=f"class {cls}")))
    return Section("latency", "Latency distributions per device", notes=notes,
                   tables=[Table("latency_by_device", "p50/p90/p99 per device (all percentiles in "
                                 "latency_by_device.csv)", table, 60, shown=_LATENCY_SHOWN)],
                   figures=figures)


def _variation_section(results: pd.DataFrame, per_device: pd.DataFrame, roles: dict[str, str],
                       absent: list[str]) -> Section:
    variation = _tables.unit_variation_table(per_device)
    summary = _tables.unit_variation_summary(variation)
    notes = ["CV = sample standard deviation / mean of the device p50s of one artifact across "
             "the class's devices. relative_p50 (devices table) is a device's median ratio to "
             "its class value: a unit that is consistently slow or fast shows here."]
    if variation.empty:
        why = ("no device class has two devices that measured the same artifact: unit-to-unit "
               "variation cannot be computed")
        absent.append(why)
        counts = per_device.groupby("device_class")["device"].nunique()
        notes.insert(0, f"The variation tables are empty: {why} (devices per class: "
                        + ", ".join(f"{c} {n}" for c, n in counts.items()) + ").")
    focus = variation.loc[variation["artifact_hash"].isin(list(roles))]
    return Section("variation", "Unit-to-unit variation within a class", notes=notes,
        tables=[Table("unit_variation_summary", "per class", summary),
                Table("unit_variation_focus", "original and chosen artifacts", focus),
                Table("devices", "devices", _tables.devices_table(results, per_device), 60)])


def _ranking_section(per_class: pd.DataFrame, chosen_by_class: dict[str, str | None],
                     classes: list[str], absent: list[str]) -> Section:
    if len(classes) < 2:
        absent.append("only one device class: ranking agreement across classes needs two")
        return Section("ranking", "Do device classes rank candidates alike?",
                       notes=["Not available: only one device class was measured."])
    table = _tables.rank_agreement_table(per_class, chosen_by_class)
    return Section("ranking", "Do device classes rank candidates alike?", notes=[
        "Kendall's tau-b and Spearman's rho between the classes' p50 rankings over the artifacts "
        "both measured (1: same order, 0: unrelated, -1: reversed)."],
        tables=[Table("rank_agreement", "class pairs", table)])


def _layers_section(entries: list[dict[str, Any]]) -> Section | None:
    if not entries:
        return None
    table = _tables.layers_table(entries)
    if table.empty:
        return Section("layers", "Per-layer units of the chosen model",
                       notes=["Not available: no chosen candidate has a per-layer table."])
    figures = [Figure(f"trial {g['trial'].iloc[0]} ({h[:12]}…), chosen on {g['classes'].iloc[0]}",
                      _plots.layers_png(g, title=f"kept units, trial {g['trial'].iloc[0]}"))
               for h, g in table.groupby("artifact_hash", sort=False)]
    return Section("layers", "Per-layer units of the chosen model",
                   tables=[Table("layers", "units before and after", table)], figures=figures)


def _objectives_section(cands: pd.DataFrame | None, entries: list[dict[str, Any]],
                        per_class: pd.DataFrame) -> Section | None:
    if cands is None:
        return None
    trials = {int(e["chosen"]["trial"]) for e in entries
              if e["chosen"] is not None and not pd.isna(e["chosen"].get("trial"))}
    png = _plots.objectives_png(cands, trials)
    predictions = Table("predictions", "the predictor: its predictions before measurement against what was "
                        "then measured, per class and metric (PREDICTED values, never told as measured)",
                        _tables.predictions_table(cands, per_class))
    if png is None:
        return Section("objectives", "Objectives vs trial", tables=[predictions],
                       notes=["Not available: no candidate row has objectives."])
    return Section("objectives", "Objectives vs trial", notes=[
        "The values told to Optuna (the candidates' objectives), by trial; triangles are predicted values "
        "(not measured), circles measured ones. Candidates rejected on a prediction were never measured "
        "unless audited (search.audit_rejections)."], figures=[Figure("objectives", png)], tables=[predictions])


def _provenance_section(run: RunData, roles: dict[str, str], absent: list[str]) -> Section:
    r = run.results
    tables = [
        Table("agents", "agent and software versions", _tables.agents_table(r)),
        Table("artifacts", "artifacts (full sha256)", _tables.artifacts_table(
            r, roles, run.candidates, run.manifests), 30),
        Table("energy_sources", "energy sources, one row per kind and device",
              _tables.energy_sources_table(r), 60),
        Table("temperatures", "device temperatures and clocks", _tables.temperatures_table(r), 60),
    ]
    figures = []
    notes = [
        "Energy kinds are kept apart: 'measured' comes from a real sensor, 'simulated' from a "
        "sensor that is a model (e.g. the sandbox's power simulator), 'estimated' is an "
        f"{ESTIMATE_BASIS}, and 'time_estimated' is the measured busy time x the device's stated "
        "power (fleet file power:). No number of one kind is ever averaged with another. The "
        "agents table names each runtime, its version and execution provider."]
    drift = _tables.drift_table(r)
    if drift.empty:
        absent.append("no drift-check (reference) rows: drift of the devices is unchecked")
    else:
        tables.append(Table("drift", "drift checks (reference rows)", drift))
        if (drift["checks"] >= 2).any():
            figures.append(Figure("drift checks", _plots.drift_png(ok_rows(r, reference=True))))
        else:  # single points on a time axis show no drift, only an empty plot
            notes.append("Drift over time is not plotted: each device has one drift check "
                         "only (the drift table lists it); a later check would show a change.")
    failures = _tables.failures_table(r)
    if not failures.empty:
        tables.append(Table("failures", "failed measurements", failures))
    return Section("provenance", "Provenance", notes=notes, tables=tables, figures=figures)

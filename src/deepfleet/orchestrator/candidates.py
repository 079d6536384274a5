"""Candidates of a search: what compression knew about each trial's model, one row per trial.

Measurement rows (``results.py``) say how fast and frugal an artifact is on each device; a
candidate row says what it is and how its trial ended: the trial's parameters, then the
:class:`~deepfleet.candidate.Candidate` field for field (same names: method, accuracies,
params, MACs, bytes, per-layer units, ...), then the verdict (objectives and constraints as
told to Optuna, predictions made before measurement, the outcome and its reason). The original
model is a row too (``kind='baseline'``, ``trial`` null), written once per study, so reports
can show original vs compressed. Reports join the two tables on ``artifact_hash``. Nested data
are Arrow lists of structs (maps for the trial's parameters), not JSON text.

Layout: ``ROOT/study=<study>/part-<uuid>-0.parquet``, appended atomically like the results
(:func:`~deepfleet.orchestrator.results.write_partitioned`). Files of schema version 1 (nested
data as ``*_json`` text) are upgraded when read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from deepfleet.candidate import Candidate, Layer
from deepfleet.errors import ResultsError
from deepfleet.orchestrator.results import write_partitioned

__all__ = ["CANDIDATES_SCHEMA", "OUTCOMES", "READ_VERSIONS", "candidate_row", "read_candidates",
           "write_candidates"]

# 2: nested columns (layers, objectives, constraints, predictions, trial_params) instead of
#    *_json text; Candidate's field names.
# 3: sensors_kept and inputs_kept; the calibration columns ece, nll, brier (null in older rows:
#    the file lacks the columns).
CANDIDATES_SCHEMA_VERSION = 3
# The versions read_candidates returns: the current one, 2 (its missing columns null) and 1
# (upgraded on read); rows keep the version they were written at. Readers check rows against
# this, not against the current version alone.
READ_VERSIONS = frozenset({1, 2, CANDIDATES_SCHEMA_VERSION})
OUTCOMES = ("measured", "infeasible", "predicted_infeasible", "failed", "baseline")

_LAYER = pa.struct([
    pa.field("name", pa.string()), pa.field("kind", pa.string()),
    pa.field("units_before", pa.int64()), pa.field("units_after", pa.int64()),
    pa.field("params_before", pa.int64()), pa.field("params_after", pa.int64()),
    pa.field("pruned", pa.bool_()), pa.field("nonzero_after", pa.int64()),
    pa.field("bits_per_weight", pa.float64()),
])
_VALUE = pa.struct([pa.field("metric", pa.string()), pa.field("device_class", pa.string()),
                    pa.field("value", pa.float64())])
_CONSTRAINT = pa.struct([pa.field("label", pa.string()), pa.field("metric", pa.string()),
                         pa.field("device_class", pa.string()), pa.field("max", pa.float64()),
                         pa.field("excess", pa.float64())])  # value - max: <= 0 is feasible
_PREDICTION = pa.struct([pa.field("metric", pa.string()), pa.field("device_class", pa.string()),
                         pa.field("value", pa.float64()), pa.field("error", pa.float64()),
                         pa.field("points", pa.int32()), pa.field("predictor", pa.string()),
                         pa.field("source", pa.string())])
_CANDIDATE_TYPES = {
    "model": pa.string(), "data": pa.string(), "method": pa.string(), "artifact_hash": pa.string(),
    "accuracy_val": pa.float64(), "accuracy_test": pa.float64(), "accuracy_drop_pp": pa.float64(),
    "ece": pa.float64(), "nll": pa.float64(), "brier": pa.float64(),
    "params": pa.int64(), "macs": pa.int64(), "bytes": pa.int64(), "kept_params": pa.float64(),
    "layers": pa.list_(_LAYER), "features": pa.map_(pa.string(), pa.float64()), "node": pa.string(),
    "train_seconds": pa.float64(), "sensors_kept": pa.list_(pa.string()), "inputs_kept": pa.list_(pa.int64()),
}
assert list(_CANDIDATE_TYPES) == [f.name for f in dataclasses.fields(Candidate)], "one name per field"

CANDIDATES_SCHEMA = pa.schema([
    pa.field("schema_version", pa.int16(), nullable=False),
    pa.field("study", pa.string(), nullable=False),
    pa.field("trial", pa.int64()),  # null for the baseline
    pa.field("kind", pa.string(), nullable=False),  # baseline | candidate
    pa.field("outcome", pa.string(), nullable=False),  # one of OUTCOMES
    pa.field("trial_params", pa.map_(pa.string(), pa.string())),  # name -> value as JSON text
    *[pa.field(name, typ) for name, typ in _CANDIDATE_TYPES.items()],
    pa.field("objectives", pa.list_(_VALUE)),  # as told to Optuna, in the study's order
    pa.field("constraints", pa.list_(_CONSTRAINT)),
    pa.field("values_source", pa.string()),  # measured | predicted | placeholder
    pa.field("predictions", pa.list_(_PREDICTION)),  # made before measurement
    pa.field("fail_reason", pa.string()),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
])
PARTITIONING = ds.partitioning(pa.schema([pa.field("study", pa.string())]), flavor="hive")


def candidate_row(*, study: str, kind: str, outcome: str, candidate: Candidate | None = None,
                  trial: int | None = None, trial_params: Mapping[str, Any] | None = None,
                  **verdict: Any) -> dict[str, Any]:
    """One row: the trial, the ``candidate`` field for field (None for a trial that failed
    before compression ended), and the verdict's columns (objectives, constraints,
    values_source, predictions, fail_reason) as lists of dicts / scalars."""
    if outcome not in OUTCOMES:
        raise ResultsError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
    names = set(CANDIDATES_SCHEMA.names) - set(_CANDIDATE_TYPES)
    unknown = set(verdict) - names
    if unknown:
        raise ResultsError(f"unknown candidate field(s) {sorted(unknown)}; accepted: {sorted(names)}")
    row: dict[str, Any] = dict.fromkeys(CANDIDATES_SCHEMA.names)
    if candidate is not None:
        row.update(candidate.to_dict())
        row["features"] = sorted(candidate.features.items())
    row.update(verdict)
    row.update(schema_version=CANDIDATES_SCHEMA_VERSION, study=study, kind=kind, outcome=outcome, trial=trial,
               trial_params=None if trial_params is None else
               [(k, json.dumps(v)) for k, v in sorted(trial_params.items())],
               created_at=verdict.get("created_at") or dt.datetime.now(dt.timezone.utc))
    return row


def write_candidates(root: str | os.PathLike[str], rows: list[dict[str, Any]]) -> Path | None:
    """Append rows (of one study) as one new file under ``root``; atomic (temp + rename)."""
    if not rows:
        return None
    studies = {r["study"] for r in rows}
    if len(studies) != 1:
        raise ResultsError(f"write_candidates takes rows of one study, got {sorted(studies)}")
    try:
        table = pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, KeyError) as exc:
        raise ResultsError(f"rows do not fit CANDIDATES_SCHEMA: {exc}") from None
    (path,) = write_partitioned(root, table, PARTITIONING)
    return path


def _v1_lists(text: Any, convert: Any) -> Any:
    if text is None or (isinstance(text, float) and pd.isna(text)):
        return None
    return convert(json.loads(text))


def _split_label(label: str) -> tuple[str, str | None]:
    # version 1 named values "metric@class"; only upgrading old files reads that form
    metric, _, cls = label.partition("@")
    return metric, cls or None


def _upgrade_v1(table: pa.Table) -> pa.Table:
    """Version-1 rows (``params_json``, ``layers_json``, ``objectives_json``,
    ``constraints_json``, ``predicted_json`` text) as version 2 rows; schema_version stays 1."""
    rows = []
    for r in table.to_pylist():
        cons = _v1_lists(r.get("constraints_json"), lambda d: d)
        rows.append({
            **{k: r.get(k) for k in CANDIDATES_SCHEMA.names if k in r},
            "trial_params": _v1_lists(r.get("params_json"), lambda d: [(k, json.dumps(v)) for k, v in sorted(d.items())]),
            "layers": _v1_lists(r.get("layers_json"), lambda ls: [
                {f: lay.get(f) for f in _LAYER.names} for lay in ls]),
            "objectives": _v1_lists(r.get("objectives_json"), lambda d: [
                dict(zip(("metric", "device_class"), _split_label(k)), value=v) for k, v in d.items()]),
            "constraints": cons and [{"label": k, "metric": _split_label(k.split("<=")[0])[0],
                                      "device_class": _split_label(k.split("<=")[0])[1], "max": None,
                                      "excess": v} for k, v in cons.items()],
            "predictions": _v1_lists(r.get("predicted_json"), lambda d: [
                dict(zip(("metric", "device_class"), _split_label(k)), value=v, error=None, points=None)
                for k, v in d.items()]),
        })
    return pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA)


def _with_new_columns(table: pa.Table) -> pa.Table:
    """A version >= 2 table with the columns added since its version (null) and in schema order."""
    for f in CANDIDATES_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(len(table), f.type))
    return table.select(CANDIDATES_SCHEMA.names)


def read_candidates(root: str | os.PathLike[str], study: str | None = None) -> pd.DataFrame:
    """Candidate rows under ``root`` (of ``study``), oldest first; raises ResultsError if absent.

    Nested columns read as lists of dicts (``trial_params`` as a dict of decoded values)."""
    root = Path(root)
    if not root.is_dir():
        raise ResultsError(f"no candidates dataset at {root}; run a search first")
    filt = (ds.field("study") == study) if study is not None else None
    try:
        tables = []
        for frag in ds.dataset(root, format="parquet", partitioning=PARTITIONING).get_fragments(filter=filt):
            t = frag.to_table()  # the fragments are already those of ``study``
            for key, value in ds.get_partition_keys(frag.partition_expression).items():
                if key not in t.column_names:
                    t = t.append_column(key, pa.array([value] * len(t), pa.string()))
            tables.append(_upgrade_v1(t) if "objectives_json" in t.column_names else _with_new_columns(t))
        table = pa.concat_tables([t.cast(CANDIDATES_SCHEMA) for t in tables]) if tables else CANDIDATES_SCHEMA.empty_table()
        frame = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype(), pa.int16(): pd.Int16Dtype()}.get,
                                maps_as_pydicts="strict")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ResultsError(f"candidates dataset at {root} cannot be read: {exc}") from None
    frame["trial_params"] = frame["trial_params"].map(
        lambda d: {k: json.loads(v) for k, v in d.items()} if isinstance(d, dict) else None)
    return frame.sort_values(["created_at"], kind="stable").reset_index(drop=True)


def known_candidates(root: str | os.PathLike[str], study: str) -> dict[str, Candidate]:
    """{artifact hash: Candidate} of every row of ``study`` that holds one (an earlier session's
    trials and the original), for the predictor's features; empty when there is no dataset."""
    if not Path(root).is_dir():
        return {}
    frame = read_candidates(root, study)
    return {str(r["artifact_hash"]): candidate_of(r) for r in frame.to_dict("records")
            if isinstance(r.get("artifact_hash"), str) and r.get("method") is not None}


def candidate_of(row: Mapping[str, Any]) -> Candidate:
    """The Candidate stored in a row of :func:`read_candidates`."""
    data = {k: row[k] for k in _CANDIDATE_TYPES}
    for k in ("params", "macs", "bytes"):
        data[k] = int(data[k])
    data["layers"] = tuple(Layer(**lay) for lay in (row["layers"] if row["layers"] is not None else ()))
    data["features"] = dict(row["features"]) if isinstance(row["features"], dict) else {}
    for k, cast in (("sensors_kept", str), ("inputs_kept", int)):
        data[k] = None if data[k] is None else tuple(cast(v) for v in data[k])
    return Candidate(**{k: (None if isinstance(v, float) and pd.isna(v) else v) for k, v in data.items()})

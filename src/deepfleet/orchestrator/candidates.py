"""Candidates of a search: what training knew about each trial's model, one row per trial.

Measurement rows (``results.py``) say how fast and frugal an artifact is on each device; a
candidate row says what it is: the trial's parameters, its compressor pipeline, validation and
test accuracy, parameters, MACs, artifact bytes, per-layer units, the objectives and constraints
told to Optuna, and how the trial ended. The original model is a row too (``kind='baseline'``,
``trial`` null), so reports can show original vs compressed. Reports join the two on
``artifact_hash``.

Layout: ``ROOT/study=<study>/part-<uuid>-0.parquet``, appended atomically like the results
(:func:`~deepfleet.orchestrator.results.write_partitioned`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from deepfleet.errors import ResultsError
from deepfleet.orchestrator.results import write_partitioned

CANDIDATES_SCHEMA_VERSION = 1
OUTCOMES = ("measured", "infeasible", "predicted_infeasible", "failed", "baseline")

CANDIDATES_SCHEMA = pa.schema([
    pa.field("schema_version", pa.int16(), nullable=False),
    pa.field("study", pa.string(), nullable=False),
    pa.field("trial", pa.int64()),  # null for the baseline
    pa.field("kind", pa.string(), nullable=False),  # baseline | candidate
    pa.field("outcome", pa.string(), nullable=False),  # one of OUTCOMES
    pa.field("method", pa.string()),  # compressor pipeline, e.g. "deepiot+fixedpoint"
    pa.field("params_json", pa.string()),  # the trial's parameters
    pa.field("model", pa.string()),
    pa.field("data", pa.string()),
    pa.field("artifact_hash", pa.string()),
    pa.field("accuracy_val", pa.float64()),
    pa.field("accuracy_test", pa.float64()),  # reported, never used for a decision
    pa.field("accuracy_drop_pp", pa.float64()),  # validation, vs the baseline
    pa.field("params", pa.int64()),
    pa.field("macs", pa.int64()),
    pa.field("bytes", pa.int64()),
    pa.field("kept_params", pa.float64()),
    pa.field("layers_json", pa.string()),  # [{name, units_before, units_after, ...}]
    pa.field("objectives_json", pa.string()),  # {label: value} as told to Optuna
    pa.field("constraints_json", pa.string()),  # {label: value - max}
    pa.field("values_source", pa.string()),  # measured | predicted | placeholder
    pa.field("predicted_json", pa.string()),  # {metric@class: prediction} before measurement
    pa.field("fail_reason", pa.string()),
    pa.field("node", pa.string()),  # Ray node that trained it
    pa.field("train_seconds", pa.float64()),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
])
PARTITIONING = ds.partitioning(pa.schema([pa.field("study", pa.string())]), flavor="hive")
_JSON = ("params_json", "layers_json", "objectives_json", "constraints_json", "predicted_json")


def candidate_row(*, study: str, kind: str, outcome: str, **fields: Any) -> dict[str, Any]:
    """A row with defaults filled in; dict/list values of the ``*_json`` columns are encoded."""
    if outcome not in OUTCOMES:
        raise ResultsError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
    unknown = set(fields) - set(CANDIDATES_SCHEMA.names)
    if unknown:
        raise ResultsError(f"unknown candidate field(s) {sorted(unknown)}")
    row: dict[str, Any] = {name: None for name in CANDIDATES_SCHEMA.names}
    row.update(fields)
    row.update(schema_version=CANDIDATES_SCHEMA_VERSION, study=study, kind=kind, outcome=outcome,
               created_at=fields.get("created_at") or dt.datetime.now(dt.timezone.utc))
    for key in _JSON:
        if row[key] is not None and not isinstance(row[key], str):
            row[key] = json.dumps(row[key], sort_keys=True)
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
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise ResultsError(f"rows do not fit CANDIDATES_SCHEMA: {exc}") from None
    (path,) = write_partitioned(root, table, PARTITIONING)
    return path


def read_candidates(root: str | os.PathLike[str], study: str | None = None) -> pd.DataFrame:
    """Candidate rows under ``root`` (of ``study``), oldest first; raises ResultsError if absent."""
    root = Path(root)
    if not root.is_dir():
        raise ResultsError(f"no candidates dataset at {root}; run a search first")
    try:
        dataset = ds.dataset(root, schema=CANDIDATES_SCHEMA, format="parquet", partitioning=PARTITIONING)
        filt = (ds.field("study") == study) if study is not None else None
        frame = dataset.to_table(filter=filt).to_pandas(
            types_mapper={pa.int64(): pd.Int64Dtype(), pa.int16(): pd.Int16Dtype()}.get)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ResultsError(f"candidates dataset at {root} cannot be read: {exc}") from None
    return frame.sort_values(["created_at"], kind="stable").reset_index(drop=True)

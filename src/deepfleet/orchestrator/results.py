"""Measurement results: ONE Arrow schema and a hive-partitioned Parquet dataset.

A row is one (device, artifact, measurement): the latency distribution, energy and the full
provenance of how it was measured (agent version, artifact hash, threads, temperatures, ...).
Failed measurements are rows too (``error`` set, measurements null): nothing is silently lost.

Layout: ``ROOT/study=<study>/device=<device>/part-<uuid>-<i>.parquet``. The partition schema is
declared (:data:`PARTITION_SCHEMA`: both strings), so a study called ``2024`` reads back as the
string ``"2024"``, not a guessed integer; values are URI-encoded in folder names, so any device
name round-trips. Every :func:`write_results` call writes new files with a fresh uuid (parallel
writers need no lock), first under ``ROOT/.staging-<uuid>/`` (hidden from readers: pyarrow
skips names starting with ``.`` or ``_``), fsynced, then moved into place with ``os.replace``:
a reader sees a whole file or none, and existing files are never rewritten.

This module may import pyarrow and pandas; the device agent may not.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from deepfleet import __version__
from deepfleet.errors import ResultsError

__all__ = [
    "ENERGY_KINDS",
    "PARTITION_SCHEMA",
    "PARTITIONING",
    "RESULTS_SCHEMA",
    "SCHEMA_VERSION",
    "UPGRADES",
    "failure_row",
    "measurement_row",
    "plain_rows",
    "read_results",
    "readable",
    "upgrade_rows",
    "version_error",
    "write_results",
]

# 2: the ``drift`` column.
# 3: which runtime ran and how (backend_version, provider, backend_file_sha256, backend_note),
#    loading (init_ms, first_run_ms), peak memory (memory_*), CPU time (cpu_p50_ms,
#    process_cpu_ms) and the time-based energy estimate (time_estimated_energy_mj,
#    stated_power_w).
# 4: sensing energy (sensing_energy_mj, sensing_basis; deepfleet.sensing), host side.
# Files of an older version lack the newer columns: the dataset is read with RESULTS_SCHEMA,
# which fills a column a file lacks with nulls, then UPGRADES bring old rows' values to the
# current meaning. A row keeps the schema_version it was written at, so a reader can tell "not
# recorded" (an older row) from "none" (e.g. no drift reference measured).
SCHEMA_VERSION = 4
ENERGY_KINDS = ("measured", "simulated", "estimated")

_TS = pa.timestamp("us", tz="UTC")

# (name, type, nullable): the order is the column order of read_results().
_COLUMNS: list[tuple[str, pa.DataType, bool]] = [
    ("schema_version", pa.int16(), False),
    ("measurement_id", pa.string(), False),  # uuid4 hex: one per row
    # where and what
    ("study", pa.string(), False),  # partition
    ("device", pa.string(), False),  # partition
    ("trial", pa.int64(), True),  # Optuna trial number; null outside a search
    ("reference", pa.bool_(), False),  # a drift-check row (a fixed reference artifact)
    # The device's latest reference p50 relative to its first in this run, minus 1 (+0.05: the
    # device runs the reference 5 % slower than at the start); null: no reference measured.
    ("drift", pa.float64(), True),
    ("device_class", pa.string(), False),
    ("arch", pa.string(), True),  # platform.machine() on the device
    ("simulated", pa.string(), True),  # what is not real (emulated CPU, simulated sensor)
    ("model_name", pa.string(), True),
    ("compressor", pa.string(), True),
    ("artifact_hash", pa.string(), False),
    ("params", pa.int64(), True),
    ("macs", pa.int64(), True),  # multiply-accumulates per sample
    ("artifact_bytes", pa.int64(), True),
    # how
    ("backend", pa.string(), True),  # the runtime that ran: numpy | onnxruntime | torch
    ("backend_version", pa.string(), True),
    ("provider", pa.string(), True),  # e.g. CPUExecutionProvider; numpy: "cpu (BLAS: openblas)"
    ("backend_file_sha256", pa.string(), True),  # model.onnx / model.ts when one ran
    ("backend_note", pa.string(), True),  # why backend "auto" passed over a preferred runtime
    ("threads", pa.int32(), True),  # in effect, as the runtime reported it; null: unknown
    ("threads_requested", pa.int32(), True),
    ("batch", pa.int32(), True),
    ("affinity", pa.list_(pa.int32()), True),
    ("warmup", pa.int32(), True),
    ("stop_reason", pa.string(), True),  # ci | minimum | max_runs | max_seconds
    # loading and memory (null: a cached model, not loaded for this row, or an older row)
    ("init_ms", pa.float64(), True),  # the runtime building its model from the files
    ("first_run_ms", pa.float64(), True),  # the fresh model's first inference
    ("memory_peak_mb", pa.float64(), True),  # peak resident rise, loading + running (MiB)
    ("memory_init_mb", pa.float64(), True),  # the same, up to the end of loading
    ("memory_baseline_mb", pa.float64(), True),  # the agent's resident memory before loading
    ("memory_method", pa.string(), True),  # clear_refs | vmhwm (see docs/measurement.md)
    # latency (ms, per run of `batch` samples)
    ("latencies_ms", pa.list_(pa.float64()), True),  # every timed run, in run order
    ("runs", pa.int32(), True),
    ("p50_ms", pa.float64(), True),
    ("p90_ms", pa.float64(), True),
    ("p99_ms", pa.float64(), True),
    ("mean_ms", pa.float64(), True),
    ("std_ms", pa.float64(), True),
    ("p50_ci_low_ms", pa.float64(), True),  # distribution-free CI of the median
    ("p50_ci_high_ms", pa.float64(), True),
    ("ci_level", pa.float64(), True),
    ("cpu_p50_ms", pa.float64(), True),  # the measuring thread's CPU time per run, median
    ("process_cpu_ms", pa.float64(), True),  # the process's CPU time per run (every thread)
    # energy (per run of `batch` samples)
    ("energy_per_inference_mj", pa.float64(), True),  # null: nothing measured
    ("energy_kind", pa.string(), True),  # measured | simulated | estimated
    ("energy_source", pa.string(), True),  # rapl | hwmon | power_supply | command | null
    ("energy_samples", pa.int32(), True),
    ("energy_sample_hz", pa.float64(), True),  # achieved rate
    ("idle_power_w", pa.float64(), True),
    ("active_power_w", pa.float64(), True),
    ("estimated_energy_mj", pa.float64(), True),  # operation-count estimate, always labelled so
    ("time_estimated_energy_mj", pa.float64(), True),  # busy time x stated power; its own kind
    ("stated_power_w", pa.float64(), True),  # the power it used (fleet file: active_w - idle_w)
    # sensing energy per run: kept sensors' datasheet power x window, an estimate (host side)
    ("sensing_energy_mj", pa.float64(), True),
    ("sensing_basis", pa.string(), True),  # how it was estimated, or why there is none
    # device state
    ("temp_before_c", pa.float64(), True),
    ("temp_after_c", pa.float64(), True),
    ("freq_before_mhz", pa.float64(), True),
    ("freq_after_mhz", pa.float64(), True),
    ("governor", pa.string(), True),
    ("load_1m", pa.float64(), True),  # load average before the runs
    # provenance
    ("agent_version", pa.string(), True),
    ("device_python", pa.string(), True),
    ("device_numpy", pa.string(), True),
    ("code_version", pa.string(), True),  # deepfleet version of the driver that wrote the row
    ("started_at", _TS, False),
    ("ended_at", _TS, True),
    ("error", pa.string(), True),  # null for a successful measurement
]

RESULTS_SCHEMA = pa.schema(
    [pa.field(name, typ, nullable=nullable) for name, typ, nullable in _COLUMNS],
    metadata={"deepfleet.schema_version": str(SCHEMA_VERSION)},
)
PARTITION_SCHEMA = pa.schema([pa.field("study", pa.string()), pa.field("device", pa.string())])
PARTITIONING = ds.partitioning(PARTITION_SCHEMA, flavor="hive")

_REQUIRED = [f.name for f in RESULTS_SCHEMA if not f.nullable]


def _upgrade_1(rows: pd.DataFrame) -> pd.DataFrame:
    # Version 2 added ``drift``; a version-1 writer never measured it: null ("not recorded").
    return rows.assign(drift=np.nan)


def _v2_to_v3(frame: pd.DataFrame) -> pd.DataFrame:
    """Version 2 rows: agents before 0.4.0 ran their numpy runtime in the device's numpy, so a
    numpy row's ``backend_version`` is its ``device_numpy``. What they did not measure (loading,
    memory, CPU time) and no time-based estimate stay null."""
    numpy_rows = frame["backend"].eq("numpy").fillna(False).astype(bool) & frame["backend_version"].isna()
    return frame.assign(backend_version=frame["backend_version"].where(~numpy_rows, frame["device_numpy"]))


def _v3_to_v4(frame: pd.DataFrame) -> pd.DataFrame:
    """Version 3 rows: no sensing energy was estimated (sensing_energy_mj, sensing_basis null)."""
    return frame


# The ONE place that knows how to read rows of an older schema version (read_results applies it,
# so every reader, the report included, gets the same answer). UPGRADES[v] takes rows of version
# v in RESULTS_SCHEMA columns (read with RESULTS_SCHEMA: a column the file lacks is null) and
# returns them as version v + 1 means them; rows keep their ``schema_version``. A version with a
# chain of upgrades up to SCHEMA_VERSION is readable; any other (older, newer, or a file without
# the column: version 0) is refused with a ResultsError. A SCHEMA_VERSION bump adds its step here.
UPGRADES: dict[int, Callable[[pd.DataFrame], pd.DataFrame]] = {1: _upgrade_1, 2: _v2_to_v3, 3: _v3_to_v4}


def readable(version: int) -> bool:
    """Whether rows of schema ``version`` can be read (the current one, or upgradable to it)."""
    return version == SCHEMA_VERSION or (
        0 < version < SCHEMA_VERSION and all(v in UPGRADES for v in range(version, SCHEMA_VERSION)))


def version_error(what: str, version: int, example: str | os.PathLike[str] | None = None
                  ) -> ResultsError:
    """The error for rows of a schema ``version`` this code cannot read, found in ``what`` (e.g.
    'results dataset at runs/x/results'), naming a file that holds them when known."""
    where = f" (e.g. {example})" if example is not None else ""
    versions = ", ".join(str(v) for v in range(1, SCHEMA_VERSION + 1) if readable(v))
    if version > SCHEMA_VERSION:
        return ResultsError(
            f"{what} holds rows of schema version {version}{where}, newer than the versions "
            f"{versions} this deepfleet reads; upgrade deepfleet to read them")
    return ResultsError(
        f"{what} holds rows of schema version {version}{where}; this deepfleet reads versions "
        f"{versions} and knows no upgrade from {version}; read them with the deepfleet that "
        "wrote them, or measure those artifacts again")


def upgrade_rows(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    """``frame`` (RESULTS_SCHEMA columns) with the rows of every older readable version upgraded
    (UPGRADES), their ``schema_version`` kept; raises :func:`version_error` for a version that
    cannot be read. Rows come back grouped by version: sort afterwards."""
    versions = frame["schema_version"].fillna(0).astype(int)
    parts = []
    for version in sorted(set(versions)):
        if not readable(version):
            raise version_error(what, version)
        rows = frame.loc[versions == version]
        for step in range(version, SCHEMA_VERSION):
            rows = UPGRADES[step](rows)
        parts.append(rows)
    return pd.concat(parts) if len(parts) > 1 else frame


def _timestamp(value: Any) -> dt.datetime | None:
    """An aware UTC datetime from an ISO 8601 string, a datetime or None."""
    if value is None or isinstance(value, dt.datetime):
        t = value
    else:
        try:
            t = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise ResultsError(f"timestamp {value!r} is not ISO 8601; the agent sends e.g. "
                               "'2026-01-31T12:00:00.000000+00:00'") from None
    if t is not None and t.tzinfo is None:
        raise ResultsError(f"timestamp {value!r} has no time zone; give UTC times")
    return t.astimezone(dt.timezone.utc) if t is not None else None


def _notes(*notes: Any) -> str | None:
    seen = [str(n) for n in notes if n]
    return "; ".join(dict.fromkeys(seen)) or None


def _base_row(*, study: str, device: str, device_class: str, artifact_hash: str,
              trial: int | None, reference: bool, started_at: Any, ended_at: Any) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "measurement_id": uuid.uuid4().hex,
        "study": study,
        "device": device,
        "trial": trial,
        "reference": reference,
        "device_class": device_class,
        "artifact_hash": artifact_hash,
        "code_version": __version__,
        "started_at": _timestamp(started_at) or dt.datetime.now(dt.timezone.utc),
        "ended_at": _timestamp(ended_at),
    }


def measurement_row(
    result: Mapping[str, Any],
    *,
    study: str,
    device: str,
    device_class: str,
    trial: int | None = None,
    reference: bool = False,
    simulated: str | None = None,
    artifact_bytes: int | None = None,
    model_name: str | None = None,
    drift: float | None = None,
    sensing: Any = None,
) -> dict[str, Any]:
    """One results row from a successful agent ``measure`` response (a dict).

    ``simulated`` is the device's own note (e.g. the fleet file's); a simulated energy sensor
    adds its note. ``model_name`` overrides the manifest's ``model``. ``drift`` is the device's
    reference drift when this was measured (see the column's comment). ``sensing`` (a
    :class:`deepfleet.sensing.SensingEnergy`) fills the sensing columns. Raises ResultsError if
    ``result`` is not a successful measure response.
    """
    if not result.get("ok") or "latencies_ms" not in result:
        raise ResultsError(
            f"measurement_row needs a successful measure response, but got ok={result.get('ok')!r}"
            f" ({result.get('kind')}: {result.get('error')}); record failures with failure_row()"
        )
    energy = result.get("energy") or {}
    row = _base_row(study=study, device=device, device_class=device_class,
                    artifact_hash=result["artifact_hash"], trial=trial, reference=reference,
                    started_at=result.get("started_at"), ended_at=result.get("ended_at"))
    load = result.get("loadavg_before") or [None]
    row.update({
        "arch": result.get("machine"),
        "simulated": _notes(simulated, energy.get("simulated_note")),
        "model_name": model_name or result.get("model"),
        "compressor": result.get("compressor"),
        "params": result.get("params"),
        "macs": result.get("macs"),
        "artifact_bytes": artifact_bytes,
        "backend": result.get("backend"),
        "backend_version": result.get("backend_version"),
        "provider": result.get("provider"),
        "backend_file_sha256": result.get("backend_file_sha256"),
        "backend_note": result.get("backend_note"),
        "init_ms": result.get("init_ms"),
        "first_run_ms": result.get("first_run_ms"),
        "memory_peak_mb": result.get("memory_peak_mb"),
        "memory_init_mb": result.get("memory_init_mb"),
        "memory_baseline_mb": result.get("memory_baseline_mb"),
        "memory_method": result.get("memory_method"),
        "cpu_p50_ms": result.get("cpu_p50_ms"),
        "process_cpu_ms": result.get("process_cpu_ms"),
        "threads": result.get("threads"),
        "threads_requested": result.get("threads_requested"),
        "batch": result.get("batch"),
        "affinity": result.get("affinity"),
        "warmup": result.get("warmup"),
        "stop_reason": result.get("stop_reason"),
        "latencies_ms": [float(v) for v in result["latencies_ms"]],
        "runs": result.get("runs"),
        "energy_per_inference_mj": energy.get("energy_per_inference_mj"),
        "energy_kind": energy.get("kind"),
        "energy_source": energy.get("source"),
        "energy_samples": energy.get("samples"),
        "energy_sample_hz": energy.get("sample_hz_achieved"),
        "idle_power_w": energy.get("idle_power_w"),
        "active_power_w": energy.get("active_power_w"),
        "estimated_energy_mj": energy.get("estimated_energy_per_inference_mj"),
        "time_estimated_energy_mj": energy.get("time_estimated_energy_per_inference_mj"),
        "stated_power_w": energy.get("stated_power_w"),
        "temp_before_c": result.get("temp_before_c"),
        "temp_after_c": result.get("temp_after_c"),
        "freq_before_mhz": result.get("freq_before_mhz"),
        "freq_after_mhz": result.get("freq_after_mhz"),
        "governor": result.get("governor_before"),
        "load_1m": load[0],
        "agent_version": result.get("agent_version"),
        "device_python": result.get("python"),
        "device_numpy": result.get("numpy"),
        "drift": drift,
        "sensing_energy_mj": getattr(sensing, "mj", None),
        "sensing_basis": getattr(sensing, "basis", None),
        "error": None,
    })
    for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "p50_ci_low_ms",
                "p50_ci_high_ms", "ci_level"):
        row[key] = result.get(key)
    return row


def failure_row(
    *,
    study: str,
    device: str,
    device_class: str,
    artifact_hash: str,
    error: str,
    trial: int | None = None,
    reference: bool = False,
    started_at: Any = None,
    ended_at: Any = None,
    **known: Any,
) -> dict[str, Any]:
    """A row for a measurement that failed (device down, corrupt artifact, agent error, ...).

    ``error`` must be a non-empty reason. ``known`` may fill any other column that is known
    (e.g. ``arch``, ``model_name``, ``params``); measurements stay null.
    """
    if not error:
        raise ResultsError("failure_row needs a non-empty error: say why the measurement failed")
    row = _base_row(study=study, device=device, device_class=device_class,
                    artifact_hash=artifact_hash, trial=trial, reference=reference,
                    started_at=started_at, ended_at=ended_at)
    row.update(known)
    row["error"] = error
    return row


def _check(rows: list[dict[str, Any]]) -> None:
    names = set(RESULTS_SCHEMA.names)
    for i, row in enumerate(rows):
        unknown = sorted(set(row) - names)
        if unknown:
            raise ResultsError(f"row {i} has columns {unknown} that are not in RESULTS_SCHEMA; "
                               "add them to the schema (and bump SCHEMA_VERSION) or drop them")
        missing = [k for k in _REQUIRED if row.get(k) is None]
        if missing:
            raise ResultsError(f"row {i} lacks required column(s) {missing}; build rows with "
                               "measurement_row() or failure_row()")
        kind = row.get("energy_kind")
        if kind is not None and kind not in ENERGY_KINDS:
            raise ResultsError(f"row {i}: energy_kind must be one of {ENERGY_KINDS}, but got {kind!r}")
        if not row["study"] or not row["device"]:
            raise ResultsError(f"row {i}: study and device must be non-empty (they name folders), "
                               f"but got study={row['study']!r}, device={row['device']!r}")


def _fsync(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_results(root: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> list[Path]:
    """Append ``rows`` to the dataset at ``root`` (created if needed); return the new files.

    Each call writes new, uniquely named files (one per study/device partition in ``rows``);
    each appears atomically. Raises ResultsError for a row that breaks the schema (nothing is
    written then).
    """
    rows = list(rows)
    if not rows:
        return []
    _check(rows)
    try:
        table = pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
        raise ResultsError(f"rows do not fit RESULTS_SCHEMA: {exc}") from None
    return write_partitioned(root, table, PARTITIONING)


def write_partitioned(root: str | os.PathLike[str], table: pa.Table,
                      partitioning: ds.Partitioning) -> list[Path]:
    """Write ``table`` under ``root`` as new, uniquely named Parquet files in hive partitions;
    each becomes visible atomically (written and fsynced in a staging folder, then renamed
    into place), so a reader or a crash never sees half a file. Returns the new files."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    staging = root / f".staging-{token}"
    written: list[str] = []
    try:
        ds.write_dataset(
            table, staging, format="parquet", partitioning=partitioning,
            basename_template=f"part-{token}-{{i}}.parquet",
            existing_data_behavior="error",  # a fresh staging dir: anything there is a bug
            file_visitor=lambda f: written.append(f.path),
        )
        final = []
        for path in written:
            _fsync(path)  # durable before it becomes visible
            dest = root / Path(path).relative_to(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)  # same file system: atomic; the uuid name never collides
            _fsync(dest.parent)
            final.append(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _pandas_type(typ: pa.DataType) -> Any:
    """Nullable pandas dtypes for integer columns (a null trial must not turn ints to floats)."""
    mapping = {pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}
    return mapping.get(typ)


def read_table(root: str | os.PathLike[str], study: str | None = None) -> pa.Table:
    """The rows under ``root`` (of ``study`` if given) as an Arrow table in RESULTS_SCHEMA."""
    root = Path(root)
    if not root.is_dir():
        raise ResultsError(f"no results dataset at {root}: the directory does not exist; measure "
                           "something first, or give the results directory of a run")
    try:
        dataset = ds.dataset(root, schema=RESULTS_SCHEMA, format="parquet",
                             partitioning=PARTITIONING)
        filt = (ds.field("study") == study) if study is not None else None
        return dataset.to_table(filter=filt)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ResultsError(f"results dataset at {root} cannot be read: {exc}") from None


def read_results(root: str | os.PathLike[str], study: str | None = None) -> pd.DataFrame:
    """The results under ``root`` as a DataFrame, one row per measurement, oldest first.

    Columns are RESULTS_SCHEMA's, in its order, with every row's partition values restored:
    strings use pandas' string dtype, integers nullable ``Int*`` dtypes, timestamps UTC,
    ``latencies_ms``/``affinity`` hold numpy arrays. A dataset with no rows (or none for
    ``study``) gives an empty frame with those columns. Rows of an older schema version are
    upgraded on read (:data:`UPGRADES`: version 1 has a null ``drift``) and keep their
    ``schema_version``. Raises ResultsError when ``root`` does not exist, a file is unreadable,
    or rows are of a version this code cannot read (newer, or older without an upgrade).
    """
    table = read_table(root, study)
    frame = table.to_pandas(types_mapper=_pandas_type)
    frame = upgrade_rows(frame[RESULTS_SCHEMA.names], f"results dataset at {root}")
    # A new frame, not an in-place sort: pandas 3's copy-on-write makes that explicit anyway.
    return frame.sort_values(["started_at", "measurement_id"], kind="stable").reset_index(drop=True)


def plain_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of a results frame as plain dicts, missing values as None (what the search's judge
    and :mod:`deepfleet.metrics` read), without the per-run lists."""
    frame = frame.drop(columns=[c for c in ("latencies_ms", "affinity") if c in frame.columns]).astype(object)
    return frame.where(frame.notna(), None).to_dict("records")

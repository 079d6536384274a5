"""Find and read what a report is made of: results rows, candidate rows, artifact manifests.

A report reads a *run directory* (``RUN/results``, ``RUN/candidates``, ``RUN/artifacts``) or a
results dataset directory itself (the folder holding ``study=...``; candidates and artifacts are
then looked for next to it). Everything read is checked here, once, so that the rest of the
report works on data it can trust:

- the results dataset exists and has rows (of the chosen study);
- every row's ``schema_version`` is the current one or has a known upgrade
  (:data:`deepfleet.orchestrator.results.UPGRADES`, which ``read_results`` applies: the report
  reads old rows exactly as the search does); rows of a newer version, or an older one with no
  upgrade, are an error that names a file holding them;
- the study exists (an unknown name is an error that lists the studies there).

What is missing but optional (candidates, artifacts, reference rows, ...) is not an error: it is
recorded in :attr:`RunData.absent` so the report can say what it could not show and why.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from deepfleet.errors import ResultsError
from deepfleet.orchestrator import candidates as cand_mod
from deepfleet.orchestrator import results as res_mod

__all__ = ["RunData", "load_run", "locate"]


@dataclass(frozen=True)
class Located:
    """Where the parts of a run are; ``candidates``/``artifacts`` are None when absent."""

    run: Path  # the run directory (the default place for the report)
    results: Path
    candidates: Path | None
    artifacts: Path | None


@dataclass(frozen=True)
class RunData:
    """Everything a report is made of, validated. Frames are never modified after loading."""

    located: Located
    study: str
    results: pd.DataFrame  # RESULTS_SCHEMA columns, rows of ``study`` only (failures included)
    candidates: pd.DataFrame | None  # CANDIDATES_SCHEMA columns, or None when there are none
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)  # artifact hash -> manifest
    absent: tuple[str, ...] = ()  # what the report cannot show, one sentence each


def _has_partitions(path: Path) -> bool:
    return any(p.is_dir() and p.name.startswith("study=") for p in path.iterdir())


def locate(path: str | os.PathLike[str]) -> Located:
    """The parts of the run at ``path`` (a run directory or a results dataset directory).

    Raises ResultsError when ``path`` does not exist or holds neither ``results/`` nor
    ``study=...`` partitions.
    """
    p = Path(path)
    if not p.is_dir():
        raise ResultsError(f"no run directory at {p}: it does not exist; give the directory of a "
                           "search or measure run (the one holding results/)")
    if (p / "results").is_dir():
        run, results = p, p / "results"
    elif _has_partitions(p):
        run, results = p.parent, p  # a results dataset given directly
    else:
        raise ResultsError(f"{p} is neither a run directory (with results/) nor a results dataset "
                           "(with study=... folders); give the directory 'deepfleet search' or "
                           "'deepfleet measure' wrote")
    cands = run / "candidates"
    arts = run / "artifacts"
    return Located(run=run, results=results, candidates=cands if cands.is_dir() else None,
                   artifacts=arts if arts.is_dir() else None)


def _parquet_files(root: Path) -> list[Path]:
    """The dataset's visible files (pyarrow skips names starting with '.' or '_')."""
    return sorted(f for f in root.rglob("*.parquet")
                  if not any(part[0] in "._" for part in f.relative_to(root).parts))


def _studies(results: Path) -> list[str]:
    """Studies with at least one results row (read from the declared partition column)."""
    try:
        table = ds.dataset(results, schema=res_mod.RESULTS_SCHEMA, format="parquet",
                           partitioning=res_mod.PARTITIONING).to_table(columns=["study"])
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        raise ResultsError(f"results dataset at {results} cannot be read: {exc}") from None
    return sorted({s for s in table.column("study").to_pylist() if s is not None})


def _file_versions(files: list[Path]) -> dict[int, Path]:
    """{schema version: one file holding rows of it}; a file without the column is version 0."""
    found: dict[int, Path] = {}
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            if "schema_version" not in pf.schema_arrow.names:
                found.setdefault(0, f)
                continue
            column = pf.read(columns=["schema_version"]).column(0)
        except (OSError, ValueError) as exc:
            raise ResultsError(f"results file {f} cannot be read: {exc}; move it out of the "
                               "dataset or restore it") from None
        for v in set(column.to_pylist()):
            found.setdefault(0 if v is None else int(v), f)
    return found


def _version_error(what: str, version: int, current: int, example: Path) -> ResultsError:
    if version > current:
        return ResultsError(
            f"{what} holds rows of schema version {version} (e.g. {example}), newer than the "
            f"version {current} this deepfleet reads; upgrade deepfleet to report on them")
    return ResultsError(
        f"{what} holds rows of schema version {version} (e.g. {example}); this deepfleet reads "
        f"version {current} and knows no upgrade from {version}; report them with the deepfleet "
        "that wrote them, or measure those artifacts again")


def _explain_unreadable(files: list[Path], where: Path) -> None:
    """Raise the schema-version error, naming a file, when files of a version this code cannot
    read made a dataset unreadable (a column that changed type, rows of an unknown version);
    return when every file is of a readable version."""
    for v, example in sorted(_file_versions(files).items()):
        if not res_mod.readable(v):
            raise _version_error(f"results dataset at {where}", v, res_mod.SCHEMA_VERSION,
                                 example) from None


def _read_results(loc: Located, study: str | None) -> tuple[str, pd.DataFrame]:
    files = _parquet_files(loc.results)
    if not files:
        raise ResultsError(f"results dataset at {loc.results} is empty (no Parquet files); "
                           "measure something first ('deepfleet measure' or a search)")
    try:
        studies = _studies(loc.results)
    except ResultsError:
        _explain_unreadable(files, loc.results)
        raise
    if not studies:
        raise ResultsError(f"results dataset at {loc.results} has no rows; measure something first")
    if study is None:
        if len(studies) > 1:
            raise ResultsError(f"results at {loc.results} hold {len(studies)} studies "
                               f"({', '.join(studies)}); choose one with --study")
        study = studies[0]
    elif study not in studies:
        raise ResultsError(f"study {study!r} is not in {loc.results}; studies there: "
                           f"{', '.join(studies)}")
    study_files = _parquet_files(loc.results / f"study={quote(study, safe='')}") or files
    try:
        frame = res_mod.read_results(loc.results, study)  # upgrades older rows
    except ResultsError:
        _explain_unreadable(study_files, loc.results)
        raise
    return study, frame


def _read_candidates(loc: Located, study: str) -> pd.DataFrame | None:
    if loc.candidates is None:
        return None
    frame = cand_mod.read_candidates(loc.candidates, study)
    if frame.empty:
        return None
    current = cand_mod.CANDIDATES_SCHEMA_VERSION
    bad = sorted(set(frame["schema_version"].fillna(0).astype(int)) - {current})
    if bad:  # no upgrade exists for candidate rows either
        files = _parquet_files(loc.candidates / f"study={quote(study, safe='')}")
        example = _file_versions(files).get(bad[0], loc.candidates)
        raise _version_error(f"candidates dataset at {loc.candidates}", bad[0], current, example)
    return frame


def _manifests(artifacts: Path | None, hashes: set[str]) -> dict[str, dict[str, Any]]:
    """Manifests of the given artifacts that exist under ``artifacts`` (unreadable ones skipped:
    a manifest only adds labels to a report, it never decides anything)."""
    out: dict[str, dict[str, Any]] = {}
    if artifacts is None:
        return out
    for h in sorted(hashes):
        path = artifacts / h / "manifest.json"
        try:
            out[h] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def load_run(path: str | os.PathLike[str], study: str | None = None) -> RunData:
    """Read and validate the run at ``path`` for ``study`` (the only study when None).

    Raises ResultsError for a missing or empty dataset, an unknown study (listing those that
    exist), several studies and none chosen, or rows of a schema version this code cannot read.
    """
    loc = locate(path)
    study, results = _read_results(loc, study)
    candidates = _read_candidates(loc, study)
    absent: list[str] = []
    if candidates is None:
        absent.append("no candidate rows (candidates/ is missing or has none for this study, as "
                      "after 'deepfleet measure'): Table 1, Pareto fronts, the chosen candidate, "
                      "per-layer units and objectives need a search run")
    elif not (candidates["kind"] == "baseline").any():
        absent.append("no baseline candidate row: Table 1 has no original model to compare with")
    hashes = set(results["artifact_hash"].dropna())
    if candidates is not None:
        hashes |= set(candidates["artifact_hash"].dropna())
    manifests = _manifests(loc.artifacts, hashes)
    if loc.artifacts is None:
        absent.append("no artifacts/ directory: artifact manifests are not shown")
    return RunData(located=loc, study=study, results=results, candidates=candidates,
                   manifests=manifests, absent=tuple(absent))

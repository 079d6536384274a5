"""``deepfleet report`` through the real command line: files written, what they hold, and bad
input (one error line, status 2, no half-written report)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from markupsafe import escape

from deepfleet.cli import main
from deepfleet.orchestrator.results import SCHEMA_VERSION, read_results, write_results
from deepfleet.report import ReportFiles, build_report
from tests.report.runs import DEFAULT_CLASSES, ClassSpec, RunInfo, make_run, measurement_rows


def _report(*args: str) -> Any:
    return CliRunner().invoke(main, ["report", *args])


def _report_files(directory: Path) -> list[str]:
    """What a report run left in ``directory``: outputs and temporary folders alike."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(("report", ".report")))


# ---------------------------------------------------------------------------- a search run


def test_cli_writes_html_markdown_csv_and_prints_where(search_run: RunInfo, tmp_path: Path) -> None:
    out = tmp_path / "out" / "fleet.html"
    result = _report(str(search_run.root), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"html     {out} (" in result.output
    assert f"summary  {out.with_suffix('.md')}" in result.output
    assert f"tables   {tmp_path / 'out' / 'fleet_tables'}/ (" in result.output
    html = out.read_text()
    # self-contained: every src/href is inline data or an in-page anchor
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), set(refs) - {""}
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert html.count('<img class="plot"') >= 8
    assert 1e5 < out.stat().st_size < 3e6
    md = out.with_suffix(".md").read_text()
    assert "## Table 1" in md and "energy SIMULATED (mJ)" in md and "VALIDATION accuracy" in md
    csvs = {p.name for p in (tmp_path / "out" / "fleet_tables").glob("*.csv")}
    assert {"table1.csv", "latency_by_device.csv", "rank_agreement.csv", "unit_variation_summary.csv",
            "layers.csv", "energy_sources.csv", "drift.csv", "agents.csv", "artifacts.csv",
            "temperatures.csv", "failures.csv", "pareto_points.csv"} <= csvs


def test_table1_follows_the_chosen_rule(search_report: tuple[ReportFiles, Any], search_run: RunInfo) -> None:
    files, _ = search_report
    t1 = pd.read_csv(files.tables / "table1.csv")
    pts = pd.read_csv(files.tables / "pareto_points.csv")
    per_class = pd.read_csv(files.tables / "per_class_metrics.csv")
    assert sorted(t1["device_class"]) == sorted(DEFAULT_CLASSES)
    for row in t1.to_dict("records"):
        cls = pts.loc[pts["device_class"] == row["device_class"]]
        eligible = cls.loc[cls["feasible"] & (cls["drop_pp"] <= 0.5)]
        chosen = cls.loc[cls["trial"] == row["chosen_trial"]].iloc[0]
        assert chosen["feasible"] and chosen["drop_pp"] <= 0.5 and chosen["outcome"] == "measured"
        assert chosen["p50_ms"] == eligible["p50_ms"].min() == row["latency_p50_compressed_ms"]
        assert chosen["front_latency"]  # on the feasible Pareto front
        base = per_class.loc[(per_class["artifact_hash"] == search_run.baseline_hash)
                             & (per_class["device_class"] == row["device_class"])].iloc[0]
        assert row["latency_p50_original_ms"] == pytest.approx(base["p50_ms"])
        assert row["latency_reduction_pct"] == pytest.approx(
            100 * (1 - row["latency_p50_compressed_ms"] / row["latency_p50_original_ms"]))
        assert row["size_original_mb"] == pytest.approx(1.72432)
        # the infeasible trial 2 (too many bytes) and the failed trials are never chosen
        assert row["chosen_trial"] not in (0, 1, 2)


def test_energy_numbers_carry_their_kind_and_stay_apart(search_report: tuple[ReportFiles, Any]) -> None:
    files, _ = search_report
    t1 = pd.read_csv(files.tables / "table1.csv").set_index("device_class")
    energy_cols = [c for c in t1.columns if "energy" in c]
    assert energy_cols and all(re.match(r"energy_(measured|simulated|estimated|time_estimated)_", c)
                               for c in energy_cols)
    # x86 has a real sensor, edison a simulated one, pi4 none: each number in its kind's column
    assert t1.loc["x86", "energy_measured_original_mj"] > 0
    assert pd.isna(t1.loc["x86", "energy_simulated_original_mj"])
    assert t1.loc["edison", "energy_simulated_original_mj"] > 0
    assert pd.isna(t1.loc["edison", "energy_measured_original_mj"])
    assert pd.isna(t1.loc["pi4", ["energy_measured_original_mj", "energy_simulated_original_mj"]]).all()
    assert (t1["energy_estimated_original_mj"] > 0).all()
    # only pi4's fleet entry states a power: the time-based estimate is there alone, beside the
    # operation-count one, never in its column
    assert (t1.loc["pi4", "energy_time_estimated_original_mj"] > t1.loc["pi4", "energy_estimated_original_mj"])
    assert pd.isna(t1.loc[["x86", "edison"], "energy_time_estimated_original_mj"]).all()
    sources = pd.read_csv(files.tables / "energy_sources.csv")
    assert set(sources["energy_kind"]) == {"measured", "simulated", "estimated"}
    assert sources.groupby(["device", "energy_kind"]).size().max() == 1
    assert (sources.loc[sources["device"].str.startswith("pi4"), "stated_power_w"] == 3.2).all()


def test_every_latency_table_names_the_runtime(search_report: tuple[ReportFiles, Any]) -> None:
    files, _ = search_report
    lat = pd.read_csv(files.tables / "latency_by_device.csv")
    runtime = {"edison": "numpy", "pi4": "onnxruntime", "x86": "onnxruntime"}
    assert (lat["backend"] == lat["device_class"].map(runtime)).all()
    assert {"cpu_p50_ms", "init_ms", "memory_peak_mb"} <= set(lat.columns) and (lat["memory_peak_mb"] > 0).all()
    per_class = pd.read_csv(files.tables / "per_class_metrics.csv")
    assert (per_class["backend"] == per_class["device_class"].map(runtime)).all()
    t1 = pd.read_csv(files.tables / "table1.csv").set_index("device_class")
    assert (t1["backend_original"] == t1.index.map(runtime)).all()
    agents = pd.read_csv(files.tables / "agents.csv")
    assert set(zip(agents["backend"], agents["provider"])) == {
        ("numpy", "cpu (BLAS: openblas)"), ("onnxruntime", "CPUExecutionProvider"),
        ("(unknown)", "(unknown)")}  # the failed rows: no runtime ran


def test_variation_ranking_layers_and_drift(search_report: tuple[ReportFiles, Any]) -> None:
    files, report = search_report
    cv = pd.read_csv(files.tables / "unit_variation_summary.csv").set_index("device_class")
    # the synthetic units differ by 4 % steps: a CV of a few %, not 0 and not 50
    assert ((cv["cv_p50_median_pct"] > 1) & (cv["cv_p50_median_pct"] < 10)).all()
    rank = pd.read_csv(files.tables / "rank_agreement.csv")
    assert len(rank) == 3 and (rank["kendall_tau_b"] > 0.8).all() and (rank["common_artifacts"] >= 20).all()
    layers = pd.read_csv(files.tables / "layers.csv")
    assert list(layers["layer"][:4]) == ["conv1", "conv2", "fc1", "fc2"]
    assert (layers["units_after"] <= layers["units_before"]).all()
    drift = pd.read_csv(files.tables / "drift.csv")
    assert len(drift) == 9 and (drift["checks"] >= 2).all()
    devices = pd.read_csv(files.tables / "devices.csv").set_index("device")
    # units are 4 % apart by construction: the slowest edison reads slower than the fastest
    assert devices.loc["edison-3", "relative_p50"] > devices.loc["edison-1", "relative_p50"]
    assert report.absent == []


def test_empty_tables_keep_their_columns_and_the_page_says_why(tmp_path: Path) -> None:
    """One device per class: no unit-to-unit variation. unit_variation_summary.csv was an empty
    file (no header); every CSV now has its columns, and the section says why it is empty."""
    one_each = {"pi4": ClassSpec(devices=1, base_ms=12.0, energy="estimated"),
                "x86": ClassSpec(devices=1, base_ms=1.5, energy="measured")}
    info = make_run(tmp_path / "run", trials=4, classes=one_each)
    files, report = build_report(info.root)
    for csv in files.csv:
        header = csv.read_text().splitlines()[:1]
        assert header and header[0].count(",") >= 1, f"{csv.name} has no header: {header}"
    summary = pd.read_csv(files.tables / "unit_variation_summary.csv")
    assert summary.empty and "cv_p50_median_pct" in summary.columns
    [section] = [s for s in report.sections if s.key == "variation"]
    assert section.notes[0].startswith("The variation tables are empty: no device class has two "
                                       "devices") and "pi4 1, x86 1" in section.notes[0]
    assert section.notes[0] in files.html.read_text()


def test_the_default_max_drop_is_the_studys_own_constraint(tmp_path: Path) -> None:
    """A study constrained to accuracy_drop_pp <= 0.3: the report chose within 0.5 pp (its own
    default) and said nothing about it; now it uses 0.3, says so, and --max-drop still wins."""
    info = make_run(tmp_path / "run", trials=24, drop_limit=0.3)
    out = tmp_path / "study.html"
    result = _report(str(info.root), "--out", str(out))
    assert result.exit_code == 0, result.output
    source = "the study's constraint accuracy_drop_pp<=0.3 (the candidates' constraints)"
    assert f"accuracy-drop limit 0.3 pp, from {source}" in result.output
    assert str(escape(f"0.3 pp (validation split), from {source}")) in out.read_text()
    assert f"0.3 pp (validation split), from {source}" in out.with_suffix(".md").read_text()
    t1 = pd.read_csv(tmp_path / "study_tables" / "table1.csv")
    assert (t1["accuracy_drop_pp"] <= 0.3).all() and t1["chosen_trial"].notna().all()
    assert (t1["note"].str.contains("within 0.3 pp")).all()
    # over 0.3 but within 0.5: what the old default would have taken, had the study allowed it
    drops = {t: 100 * (0.985 - v["accuracy_val"]) for t, v in info.trials.items()}
    assert any(0.3 < d <= 0.5 for d in drops.values())

    explicit = tmp_path / "explicit.html"
    result = _report(str(info.root), "--out", str(explicit), "--max-drop", "0.2")
    assert result.exit_code == 0, result.output
    assert "accuracy-drop limit 0.2 pp, from --max-drop\n" in result.output
    t1 = pd.read_csv(tmp_path / "explicit_tables" / "table1.csv")
    assert (t1["accuracy_drop_pp"].dropna() <= 0.2).all()
    result = _report(str(info.root), "--out", str(explicit), "--max-drop", "1")
    assert "from --max-drop (larger drops still break the study's constraint " in result.output


def test_max_drop_sources() -> None:
    from deepfleet.report._build import max_drop

    assert max_drop(None, {}) == (0.5, "the default: the study has no accuracy_drop_pp "
                                       "constraint in the candidates' constraints")
    value, source = max_drop(None, {"accuracy_drop_pp<=2": 2.0, "accuracy_drop_pp@pi4<=1.5": 1.5})
    assert value == 1.5 and "accuracy_drop_pp@pi4<=1.5" in source and "strictest" in source
    assert max_drop(0.7, {}) == (0.7, "--max-drop")
    assert max_drop(0.0, {"accuracy_drop_pp<=2": 2.0}) == (0.0, "--max-drop")


def _copy_report(files: ReportFiles, directory: Path) -> Path:
    """A copy of an existing report in ``directory`` (as ``report.*``): cheaper than a build."""
    shutil.copy(files.html, directory / "report.html")
    shutil.copy(files.markdown, directory / "report.md")
    shutil.copytree(files.tables, directory / "report_tables")
    return directory / "report.html"


def test_rewriting_replaces_the_tables_folder(measure_run: RunInfo, measure_report: tuple[ReportFiles, Any],
                                              tmp_path: Path) -> None:
    out = _copy_report(measure_report[0], tmp_path)
    (tmp_path / "report_tables" / "stale.csv").write_text("old\n")
    build_report(measure_run.root, out=out, max_drop_pp=2.0)
    assert not (tmp_path / "report_tables" / "stale.csv").exists()
    assert "2 pp (validation split)" in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md", "report_tables"]


# ---------------------------------------------------------------------------- a measure run


def test_measure_run_reports_what_it_can_and_says_what_is_absent(measure_run: RunInfo) -> None:
    result = _report(str(measure_run.root / "results"))  # the dataset itself works too
    assert result.exit_code == 0, result.output
    assert "absent: no candidate rows" in result.output
    assert "absent: no artifacts/ directory" in result.output
    assert "accuracy-drop limit 0.5 pp, from the default: the study has no" in result.output
    out = measure_run.root / "report.html"  # next to results/, never inside it
    html = out.read_text()
    assert "Not in this report, and why" in html and "Table 1: original vs compressed" in html
    tables = measure_run.root / "report_tables"
    assert not (tables / "table1.csv").exists()
    lat = pd.read_csv(tables / "latency_by_device.csv")
    assert set(lat["device"]) == {f"{c}-{i + 1}" for c, s in DEFAULT_CLASSES.items()
                                  for i in range(s.devices)}
    assert ((lat["p50_ms"] <= lat["p90_ms"]) & (lat["p90_ms"] <= lat["p99_ms"])).all()
    # energy: the median of each device's own successful rows of that kind, nothing else
    raw = read_results(measure_run.root / "results")
    raw = raw.loc[raw["error"].isna() & ~raw["reference"].fillna(False).astype(bool)]
    sim = (raw.loc[raw["energy_kind"] == "simulated"]
           .groupby(["device", "artifact_hash"])["energy_per_inference_mj"].median())
    assert len(sim) > 0
    got = lat.set_index(["device", "artifact_hash"])["energy_simulated_mj"].dropna()
    assert len(got) > 0 and got.index.isin(sim.index).all()
    assert got.to_numpy() == pytest.approx(sim.loc[got.index].to_numpy())
    assert html.count('<img class="plot"') == len(DEFAULT_CLASSES) + 1  # boxes per class + drift


# ---------------------------------------------------------------------------- bad input


def _old_schema(root: Path) -> None:
    """Rows of version 0: older than any this deepfleet can upgrade (version 1 it can)."""
    write_results(root / "results", measurement_rows("s"))
    write_results(root / "results", measurement_rows("s", schema_version=0))


def _old_file_layout(root: Path) -> None:
    """A file as an older writer might have left it: version 0, a column of another type (no
    writer of that version exists any more, so it is written with pyarrow directly)."""
    write_results(root / "results", measurement_rows("s"))
    folder = root / "results" / "study=s" / "device=pi4-1"
    pq.write_table(pa.table({"schema_version": pa.array([0], pa.int16()),
                             "p50_ms": pa.array(["12.5 ms"])}), folder / "part-old.parquet")


def _newer_schema(root: Path) -> None:
    write_results(root / "results", measurement_rows("s", schema_version=SCHEMA_VERSION + 1))


def _two_studies(root: Path) -> None:
    write_results(root / "results", measurement_rows("alpha") + measurement_rows("beta"))


def _run_and_a_file(root: Path) -> None:
    write_results(root / "results", measurement_rows("s"))
    (root.parent / "some_file.txt").write_text("notes\n")


def _empty(root: Path) -> None:
    (root / "results").mkdir(parents=True)


def _not_a_run(root: Path) -> None:
    (root / "notes").mkdir(parents=True)


@pytest.mark.parametrize(("make", "args", "expected"), [
    (None, [], r"no run directory at .*: it does not exist"),
    (_empty, [], r"results dataset at .*results is empty \(no Parquet files\)"),
    (_not_a_run, [], r"is neither a run directory \(with results/\) nor a results dataset"),
    (_old_schema, [], r"holds rows of schema version 0 \(e\.g\. .*part-.*\.parquet\);"
                      rf" this deepfleet reads versions {', '.join(map(str, range(1, SCHEMA_VERSION + 1)))} and knows no upgrade"),
    (_old_file_layout, [], r"schema version 0 \(e\.g\. .*part-old\.parquet\)"),
    (_newer_schema, [], rf"schema version {SCHEMA_VERSION + 1} .*newer .* upgrade deepfleet"),
    (_two_studies, [], r"hold 2 studies \(alpha, beta\); choose one with --study"),
    (_two_studies, ["--study", "gamma"], r"study 'gamma' is not in .*; studies there: alpha, beta"),
    (_two_studies, ["--max-drop", "-1"], r"--max-drop must be >= 0"),
    (_two_studies, ["--study", "alpha", "--out", "{root}/results/r.html"],
     r"is inside the results dataset"),
    (_run_and_a_file, ["--out", "{root}/../some_file.txt/x/report.html"],
     r"--out .*some_file\.txt/x/report\.html lies under .*some_file\.txt, which is a file, not a "
     r"folder; .* e\.g\. --out .*/report\.html$"),
], ids=["missing", "empty", "not-a-run", "old-schema", "old-file-layout", "newer-schema", "no-study-chosen", "unknown-study",
        "negative-drop", "out-inside-results", "out-under-a-file"])
def test_bad_input_is_one_error_line_status_2_and_nothing_written(
        tmp_path: Path, make: Any, args: list[str], expected: str) -> None:
    root = tmp_path / "run"
    if make is not None:
        make(root)
    # an earlier report must survive a failed one untouched
    (tmp_path / "report.html").write_text("earlier report")
    out = tmp_path / "report.html"
    args = [a.replace("{root}", str(root)) for a in args]
    if "--out" not in args:
        args += ["--out", str(out)]
    result = _report(str(root), *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepfleet: error: "), result.stderr
    assert re.search(expected, lines[0]), lines[0]
    assert result.stdout == ""
    assert _report_files(tmp_path) == ["report.html"]
    assert (tmp_path / "report.html").read_text() == "earlier report"
    assert sorted(p.name for p in tmp_path.iterdir()) in (["report.html"], ["report.html", "run"],
                                                          ["report.html", "run", "some_file.txt"])
    if root.exists():
        assert not [p for p in root.rglob("*") if "report" in p.name]


def test_a_failure_while_writing_leaves_no_half_written_report(
        measure_run: RunInfo, measure_report: tuple[ReportFiles, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = _copy_report(measure_report[0], tmp_path)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    calls = {"n": 0}
    real = pd.DataFrame.to_csv

    def failing_to_csv(self: pd.DataFrame, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:  # some CSV files written, the page and summary too
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing_to_csv)
    with pytest.raises(OSError, match="No space left"):
        build_report(measure_run.root, out=out, max_drop_pp=3.0)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # the earlier report, byte for byte; no temporary files left


def test_a_class_measured_in_two_runtimes_gets_no_class_value_and_says_why(tmp_path: Path) -> None:
    """pi4-1 measured the original once more, in numpy (it lacked onnxruntime then): the
    class's devices ran two runtimes, so the original has no pi4 value, and Table 1 says why
    rather than dividing a numpy time by an onnxruntime one."""
    import numpy as np

    from deepfleet.orchestrator.results import measurement_row
    from tests.report.runs import T0, agent_response, make_run

    info = make_run(tmp_path / "run", trials=6, failures=0)
    spec = DEFAULT_CLASSES["pi4"]
    resp = agent_response(np.random.default_rng(1), artifact_hash=info.baseline_hash, p50_ms=40.0, runs=20,
                          spec=spec, params=431_080, macs=2_293_000, started=T0)
    resp.update(backend="numpy", backend_version="1.24.2", provider="cpu (BLAS: openblas)")
    write_results(info.root / "results", [measurement_row(resp, study=info.study, device="pi4-1",
                                                          device_class="pi4")])
    files, _ = build_report(info.root)
    per_class = pd.read_csv(files.tables / "per_class_metrics.csv")
    base = per_class.loc[(per_class["artifact_hash"] == info.baseline_hash)].set_index("device_class")
    assert pd.isna(base.loc["pi4", "p50_ms"]) and base.loc["pi4", "backend"].startswith("mixed: numpy (pi4-1)")
    assert base.loc["x86", "p50_ms"] > 0  # other classes keep their values
    t1 = pd.read_csv(files.tables / "table1.csv").set_index("device_class")
    assert pd.isna(t1.loc["pi4", "latency_reduction_pct"])
    assert "the original has no class value" in t1.loc["pi4", "note"] and "numpy on pi4-1" in t1.loc["pi4", "note"]
    lat = pd.read_csv(files.tables / "latency_by_device.csv")
    pi41 = lat.loc[(lat["device"] == "pi4-1") & (lat["artifact_hash"] == info.baseline_hash)]
    assert sorted(pi41["backend"]) == ["numpy", "onnxruntime"]  # one row each, never pooled

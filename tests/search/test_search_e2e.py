"""The search as a user runs it: the CLI, a real local Ray, SQLite Optuna storage, the local
device's agent, Parquet results. Tiny settings keep each search to about a minute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from deepfleet.orchestrator.candidates import read_candidates
from deepfleet.orchestrator.results import read_results

TINY = {
    "model": "mlp",
    "data": "digits",
    "space": {"deepiot.target": {"low": 0.03, "high": 0.3, "log": True}, "deepiot.iterations": 30,
              "deepiot.eval_every": 30},
    "training": {"finetune_epochs": 1},
    "objectives": ["accuracy", {"metric": "latency_p50", "class": "local"}],
    "parallelism": 2,
    "measure": {"min_runs": 5, "min_seconds": 0.05, "max_seconds": 0.5},
}


def write_study(tmp: Path, **overrides: object) -> Path:
    study = {"name": "t", **TINY, **overrides}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def run_search(tmp: Path, *args: str, timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deepfleet.cli", "search", *args], cwd=tmp, text=True,
                          capture_output=True, timeout=timeout,
                          env=env or {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("search")
    os.environ.setdefault("DEEPFLEET_CACHE", str(tmp / "cache"))
    study = write_study(tmp, trials=3, constraints=[{"metric": "accuracy_drop_pp", "max": 30}])
    proc = run_search(tmp, str(study), "--out", "run", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", json.loads(proc.stdout)


def test_cluster_yaml_is_a_valid_ray_cluster_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((Path(__file__).parents[2] / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on a schema error
    assert config["provider"]["type"] == "local"
    assert any("rm -rf ~/.deepfleet/fleet" in c for c in config["worker_setup_commands"])


def test_search_trains_measures_and_tells_every_trial(finished_run) -> None:
    run, summary = finished_run
    assert summary["trials"]["complete"] == 3 and summary["trials"]["failed"] == 0
    assert summary["pareto"], "a feasible front exists when the constraint is loose"
    rows = read_results(run / "results", study="t")
    cands = read_candidates(run / "candidates", study="t")
    trial_rows = rows[rows["trial"].notna()]
    assert sorted(trial_rows["trial"].astype(int)) == [0, 1, 2]
    assert (rows["error"].isna()).all() and (rows["device"] == "local").all()
    baseline = cands[cands["kind"] == "baseline"]
    assert len(baseline) == 1 and baseline["artifact_hash"].iloc[0] in set(rows["artifact_hash"])
    # every told value is the measured one: latency objective == the row's p50
    for _, c in cands[cands["kind"] == "candidate"].iterrows():
        told = {(o["metric"], o["device_class"]): o["value"] for o in c["objectives"]}
        row = rows[rows["artifact_hash"] == c["artifact_hash"]].iloc[0]
        assert told[("latency_p50", "local")] == pytest.approx(row["p50_ms"])
        assert told[("accuracy", None)] == pytest.approx(c["accuracy_val"])
        assert (run / "artifacts" / c["artifact_hash"] / "manifest.json").is_file()
    # plain Optuna (and so optuna-dashboard) sees the objectives' names and the constraints
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{run / 'study.db'}")
    assert study.metric_names == ["accuracy", "latency_p50@local"]
    assert len(study.trials) == 3 and all(t.constraints for t in study.trials)
    assert {t.number for t in study.best_trials} == {p["trial"] for p in summary["pareto"]}


def test_constraint_broken_before_measurement_costs_no_device_time(tmp_path: Path, finished_run) -> None:
    study = write_study(tmp_path, name="tight", trials=2, constraints=[{"metric": "bytes", "max": 1000}])
    proc = run_search(tmp_path, str(study), "--out", "run", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["trials"]["complete"] == 2 and summary["pareto"] == []
    rows = read_results(tmp_path / "run" / "results", study="tight")
    assert rows["trial"].notna().sum() == 0  # only the baseline was measured
    cands = read_candidates(tmp_path / "run" / "candidates", study="tight")
    outcomes = cands[cands["kind"] == "candidate"]["outcome"]
    assert set(outcomes) == {"infeasible"}
    assert all("bytes<=1000" in r for r in cands[cands["kind"] == "candidate"]["fail_reason"])


def test_all_devices_of_a_class_down_fails_trials_with_the_reason(tmp_path: Path, finished_run) -> None:
    # a device whose port nobody listens on: connection refused, quarantined, class down
    fleet = tmp_path / "fleet.yaml"
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text("")
    fleet.write_text(yaml.safe_dump({"devices": [
        {"name": "ghost", "class": "pi", "host": "127.0.0.1", "port": 9, "user": "root",
         "key": str(key), "known_hosts": str(known)}]}))
    study = write_study(tmp_path, name="down", trials=2, classes=["pi"], fleet=str(fleet),
                        objectives=["accuracy", {"metric": "latency_p50", "class": "pi"}])
    proc = run_search(tmp_path, str(study), "--out", "run", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["trials"]["failed"] == 2 and summary["trials"]["complete"] == 0
    study_obj = optuna.load_study(study_name="down", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    reasons = [t.user_attrs["fail_reason"] for t in study_obj.trials]
    assert all("ghost" in r or "class 'pi'" in r for r in reasons), reasons
    # the broker's own error, not the Ray traceback that carried it from the actor
    assert all("\n" not in r and "ray::" not in r for r in reasons), reasons
    failures = read_results(tmp_path / "run" / "results", study="down")
    assert failures["error"].notna().all() and (failures["device"] == "ghost").all()


def test_resume_after_the_driver_is_killed_loses_and_duplicates_nothing(tmp_path: Path, finished_run) -> None:
    study = write_study(tmp_path, name="resume", trials=5)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    driver = subprocess.Popen([sys.executable, "-m", "deepfleet.cli", "search", str(study), "--out", "run", "--json"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True)
    cand_dir = tmp_path / "run" / "candidates"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:  # kill as soon as two trials have finished
        if cand_dir.is_dir() and len(read_candidates(cand_dir, study="resume")) >= 3:
            break
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = read_results(tmp_path / "run" / "results", study="resume")
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    running = [t.number for t in optuna.load_study(study_name="resume", storage=storage).trials
               if t.state == optuna.trial.TrialState.RUNNING]
    proc = run_search(tmp_path, str(study), "--out", "run", "--json", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    # the study's count of trials, the interrupted ones counted apart (and run again)
    assert summary["trials"]["complete"] + summary["trials"]["failed"] == 5
    assert summary["trials"]["interrupted"] == len(running) and summary["trials"]["failed"] == 0
    assert [s["session"] for s in summary["sessions"]] == [1]  # the killed session wrote none
    # no trial spent on settings already finished
    plain = optuna.load_study(study_name="resume", storage=storage)
    done = [json.dumps(t.params, sort_keys=True) for t in plain.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == len(set(done)) == 5
    cands = read_candidates(cand_dir, study="resume")
    assert (cands["kind"] == "baseline").sum() == 1
    assert not cands[cands["kind"] == "candidate"].duplicated("trial").any()
    after = read_results(tmp_path / "run" / "results", study="resume")
    assert set(before["measurement_id"]) <= set(after["measurement_id"])  # nothing measured is lost
    # ... and nothing is measured twice (the reference model is, by design: each driver start
    # measures it first, as the baseline of that run's drift check)
    ok = after[after["error"].isna() & ~after["reference"]]
    assert not ok.duplicated(["artifact_hash", "device"]).any()
    assert after["reference"].sum() == 2


def test_rerunning_an_existing_study_without_resume_is_refused(tmp_path: Path, finished_run) -> None:
    run, _ = finished_run
    study = write_study(tmp_path, trials=1)
    proc = run_search(tmp_path, str(study), "--out", str(run))
    assert proc.returncode == 2 and "--resume" in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
        (["--trials", "0"], "--trials must be >= 1"),
    ],
)
def test_bad_invocations_are_one_clear_line(tmp_path: Path, args: list[str], needle: str) -> None:
    study = write_study(tmp_path, trials=1)
    proc = run_search(tmp_path, str(study), *args, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("deepfleet: error:")]
    assert lines and needle in lines[0], proc.stderr[-2000:]


def test_malformed_study_file_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "study.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "model": "mlp", "data": "digits", "objectives": ["speed"]}))
    proc = run_search(tmp_path, str(bad), timeout=120)
    assert proc.returncode == 2
    assert f"{bad}: objectives[0]: unknown metric 'speed'" in proc.stderr


def test_energy_on_a_class_without_a_sensor_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    # this machine has no energy sensor: the local device gives op-count estimates only
    if any(Path("/sys/class/powercap").glob("*")) or any(Path("/sys/class/hwmon").glob("*")):
        pytest.skip("this machine has an energy sensor")
    study = write_study(tmp_path, trials=1, objectives=["accuracy", {"metric": "energy", "class": "local"}])
    proc = run_search(tmp_path, str(study), "--out", "run", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("deepfleet: error:")]
    assert len(lines) == 1 and "local (no sensor)" in lines[0] and "energy_estimated" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_typo_in_model_or_data_is_found_on_load(tmp_path: Path) -> None:
    study = write_study(tmp_path, trials=1, model="lenet55")
    proc = run_search(tmp_path, str(study), "--out", "run", timeout=120)
    assert proc.returncode == 2 and "model: unknown model 'lenet55'" in proc.stderr
    assert not (tmp_path / "run").exists()

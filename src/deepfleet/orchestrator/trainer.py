"""Training one search candidate: a Ray task that returns plain data, never a live model.

``train_candidate(job)`` compresses the study's model with the trial's parameters through the
public API (:func:`deepfleet.compress`) in a private directory, then returns the artifacts as
bytes so that they can travel through Ray's object store to the driver's node whatever node
trained them. Everything the objectives need that training knows (validation accuracy, drop
against the original, params, MACs, bytes, per-layer units) comes back with it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from deepfleet.device_agent.format import ARTIFACT_FILES


def _artifact_bytes(path: str | Path) -> dict[str, bytes]:
    p = Path(path)
    return {name: (p / name).read_bytes() for name in ARTIFACT_FILES}


def compress_settings(params: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`deepfleet.compress` for a trial's flat parameters.

    ``method`` is the pipeline; every ``M.setting`` configures method M when M is in it (a
    method's settings are conditional on it being chosen), e.g. ``deepiot.target``,
    ``fixedpoint.bits``, ``fixedpoint.rounding``; ``training.finetune_epochs`` shortens
    fine-tuning (a search affords less). Unknown settings fail when the pipeline is built.
    """
    from deepfleet.api import FINETUNE
    from deepfleet.compressors import parse_methods
    from deepfleet.search._study import apply_params

    methods = parse_methods(str(params.get("method", "deepiot")))
    per_method = apply_params(params)
    finetune = FINETUNE
    if "finetune_epochs" in training:
        finetune = dataclasses.replace(FINETUNE, epochs=int(training["finetune_epochs"]))
    return {"method": methods, "settings": {m: dict(per_method.get(m, {})) for m in methods},
            "finetune": finetune}


def train_candidate(job: dict[str, Any]) -> dict[str, Any]:
    """Compress for one trial. ``job``: model, data, seed, params, training, threads.

    Returns candidate facts plus ``files`` (the compressed artifact) and ``original_files``.
    Raises the API's DeepfleetError subclasses unchanged (Ray re-raises them in the driver).
    """
    import torch

    from deepfleet.api import compress

    torch.set_num_threads(int(job.get("threads", 1)))
    t0 = time.perf_counter()
    settings = compress_settings(job["params"], job.get("training", {}))
    method = "+".join(settings["method"])
    with tempfile.TemporaryDirectory(prefix="deepfleet-trial-") as tmp:
        r = compress(job["model"], data=job["data"], seed=job["seed"], out=tmp, progress=False,
                     **settings)
        files, original = _artifact_bytes(r["artifact"]), _artifact_bytes(r["artifact_original"])
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()
    return {
        "method": method,
        "digest": Path(r["artifact"]).name,
        "original_digest": Path(r["artifact_original"]).name,
        "files": files,
        "original_files": original,
        "accuracy": r["val_accuracy_after"],
        "accuracy_test": r["accuracy_after"],
        "accuracy_base_val": r["val_accuracy_before"],
        "accuracy_base_test": r["accuracy_before"],
        "accuracy_drop_pp": 100.0 * (r["val_accuracy_before"] - r["val_accuracy_after"]),
        "params": r["params_after"],
        "params_base": r["params_before"],
        "macs": r["macs_after"],
        "macs_base": r["macs_before"],
        "bytes": r["bytes_after"],
        "bytes_base": r["bytes_before"],
        "kept_params": r["kept_params"],
        "layers": r["layers"],
        "node": node,
        "pid": os.getpid(),
        "train_seconds": time.perf_counter() - t0,
    }


def train_base(job: dict[str, Any]) -> dict[str, Any]:
    """Train (or find cached) the study's base model once, before any trial needs it.

    Trials then hit the cache instead of all training the same base at once. Returns its
    validation accuracy and whether it came from the cache.
    """
    import torch

    from deepfleet.api import BASE_TRAINING, trained_base
    from deepfleet.compressors.training import accuracy
    from deepfleet.data import load_data

    torch.set_num_threads(int(job.get("threads", 1)))
    data = load_data(job["data"])
    model, cached = trained_base(job["model"], data, seed=job["seed"], cfg=BASE_TRAINING,
                                 device=torch.device("cpu"), progress=False)
    return {"val_accuracy": accuracy(model, data.X_val, data.y_val), "cached": cached}


def write_artifact_files(root: Path, digest: str, files: dict[str, bytes]) -> Path:
    """Materialise an artifact from bytes under ``root`` (atomic: temp dir, then rename)."""
    final = root / digest
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    try:
        os.rename(tmp, final)
    except OSError:  # another writer won the race with identical content
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return final

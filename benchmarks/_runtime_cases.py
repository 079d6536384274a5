"""The artifacts ``runtimes.py`` measures: compressions through ``deepfleet.api.compress``, each
made once and kept in ``$DEEPFLEET_CACHE/bench-runtimes/<key>/`` (key: the sha256 of its
settings), so that the timing parts can be rerun without compressing again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from deepfleet._files import cache_dir, write_json

# The README's DeepIoT targets. DeepSense and the BiLSTM search with 1500 iterations, as
# compress.py's parts for them do (the search trains a masked recurrent net step by step).
ZOO: dict[str, dict[str, Any]] = {
    "lenet5": {"data": "digits", "target_params": 0.01},
    "mlp": {"data": "digits", "target_params": 0.03},
    "deepsense": {"data": "sensing", "target_params": 0.06,
                  "settings": {"deepiot": {"iterations": 1500}}},
    "bilstm": {"data": "sensing", "target_params": 0.10,
               "settings": {"deepiot": {"iterations": 1500}}},
}
INT8_ACT = {"fixedpoint": {"bits": 8, "act_bits": 8}}
SMOKE = False  # set by ``runtimes.py --smoke``: every compression in its quick form


def _smoke(spec: dict[str, Any]) -> dict[str, Any]:
    """The quick form of a compression (3-epoch base, 40 search iterations, 1 fine-tuning
    epoch): checks that the benchmark runs, measures nothing worth keeping."""
    settings = {m: {k: v for k, v in s.items() if k not in ("iterations", "eval_every")}
                for m, s in spec.get("settings", {}).items()}
    return {**spec, "settings": settings, "quick": True, "finetune_epochs": 1}


def zoo_spec(model: str) -> dict[str, Any]:
    return {"model": model, "method": "deepiot", **ZOO[model]}


def int8_spec(model: str) -> dict[str, Any]:
    """DeepIoT then 8-bit fixed point with 8-bit activations (an int8 QDQ graph on onnxruntime)."""
    z = ZOO[model]
    return {"model": model, "method": "deepiot,fixedpoint", "data": z["data"],
            "target_params": z["target_params"], "settings": {**z.get("settings", {}), **INT8_ACT}}


def int8_original_spec(model: str) -> dict[str, Any]:
    """The original at 8 bits: fixed point only, 8-bit activations."""
    return {"model": model, "method": "fixedpoint", "data": ZOO[model]["data"], "settings": INT8_ACT}


def search_specs(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` candidates drawn as the demo study's search draws them (``search/demo.yaml``):
    DeepIoT's target log-uniform in 0.5-10 %, alone or followed by 4- or 8-bit fixed point, a
    short search (400 iterations) and fine-tuning (15 epochs); alternately on lenet5 and mlp."""
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        model = ("lenet5", "mlp")[i % 2]
        target = round(math.exp(rng.uniform(math.log(0.005), math.log(0.1))), 5)
        settings: dict[str, Any] = {"deepiot": {"iterations": 400, "eval_every": 200}}
        method = rng.choice(["deepiot", "deepiot,fixedpoint"])
        if method != "deepiot":
            settings["fixedpoint"] = {"bits": rng.choice([4, 8])}
        specs.append({"model": model, "data": "digits", "method": method, "target_params": target,
                      "settings": settings, "finetune_epochs": 15})
    return specs


def _key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _folder(spec: dict[str, Any]) -> Path:
    return cache_dir() / "bench-runtimes" / _key(spec)


def cached(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The compress summary of ``spec`` when it was made before (its artifacts still there)."""
    path = _folder(spec) / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if not (Path(summary["artifact"]).is_dir() and Path(summary["artifact_original"]).is_dir()):
        return None
    return summary


def _compress_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One compression in a fresh process, one torch thread, on the CPU. Both artifacts get a
    TorchScript ``model.ts`` of the torch module they were exported from (the agent's torch
    backend runs that file), traced from the modules ``compress`` hands to ``export_artifact``."""
    import dataclasses

    import torch

    torch.set_num_threads(1)
    import deepfleet.api as api

    nets: dict[str, Any] = {}
    export = api.export_artifact

    def capture(net: Any, **kwargs: Any) -> Any:
        exported, files = export(net, **kwargs)
        nets[files.digest] = (net, kwargs["data"].X_val[:2])
        return exported, files

    options = {k: v for k, v in spec.items() if k not in ("model", "finetune_epochs")}
    if "finetune_epochs" in spec:
        options["finetune"] = dataclasses.replace(api.FINETUNE, epochs=spec["finetune_epochs"])
    folder = _folder(spec)
    api.export_artifact = capture  # type: ignore[assignment]
    try:
        summary = api.compress(spec["model"], out=folder, seed=0, device="cpu", progress=False, **options)
    finally:
        api.export_artifact = export  # type: ignore[assignment]
    for key in ("artifact", "artifact_original"):
        net, x = nets[Path(summary[key]).name]
        try:
            with torch.no_grad():
                traced = torch.jit.trace(net.cpu().eval(), torch.as_tensor(x), check_trace=False)
            traced.save(str(Path(summary[key]) / "model.ts"))
        except Exception as exc:  # fake-quantised modules may not trace: torch is then not timed
            summary.setdefault("torchscript_errors", {})[key] = f"{type(exc).__name__}: {exc}"[:300]
    summary["spec"] = spec
    write_json(folder / "summary.json", summary)
    return summary


def ensure(specs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """The summaries of ``specs`` in order, compressing (in ``workers`` processes) those not
    cached. Base models come from deepfleet's own cache (trained once per model and data)."""
    if SMOKE:
        specs = [_smoke(s) for s in specs]
    todo = [s for s in specs if cached(s) is None]
    todo = list({_key(s): s for s in todo}.values())
    if todo:
        print(f"compressing {len(todo)} candidate(s) in {workers} process(es)", flush=True)
        # One model's base is trained by its first job; the others of that model wait for it
        # rather than training it again in parallel: bases first, one job per model.
        firsts = list({s["model"]: s for s in reversed(todo)}.values())
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_compress_job, firsts))
            rest = [s for s in todo if cached(s) is None]
            for i, _ in enumerate(pool.map(_compress_job, rest), 1):
                print(f"  {i}/{len(rest)} done", flush=True)
    out = []
    for s in specs:
        summary = cached(s)
        if summary is None:
            raise SystemExit(f"compression {s} left no artifacts in {_folder(s)}")
        out.append(summary)
    return out


def nice() -> None:
    """Lower this process's priority: the machine is shared."""
    try:
        os.nice(10)
    except OSError:
        pass


def float_twin(artifact: str) -> str:
    """The fp32 twin of a fixed-point artifact: the same graph with every weight decoded to
    float32 and the activation quantisers (``fake_quant``) removed, so that onnxruntime runs it
    in float; written (once) next to the artifact's folder. Returns its directory."""
    import numpy as np

    from deepfleet.artifact import build_artifact, save_artifact
    from deepfleet.device_agent.format import decode_tensor

    src = Path(artifact)
    graph = json.loads((src / "graph.json").read_text())
    manifest = json.loads((src / "manifest.json").read_text())
    with np.load(src / "weights.npz") as npz:
        stored = {k: npz[k] for k in npz.files}
    arrays = {}
    for name, spec in graph["tensors"].items():
        arrays[name] = decode_tensor(name, spec, stored)
        graph["tensors"][name] = {"encoding": "float32", "shape": list(arrays[name].shape)}
    alias = {op["name"]: op["inputs"][0] for op in graph["ops"] if op["op"] == "fake_quant"}

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    graph["ops"] = [{**op, "inputs": [resolve(i) for i in op["inputs"]]}
                    for op in graph["ops"] if op["op"] != "fake_quant"]
    graph["outputs"] = [resolve(o) for o in graph["outputs"]]
    manifest.pop("onnx", None)
    manifest.pop("weights_bytes", None)
    manifest["twin_of"] = src.name
    files = build_artifact(graph, arrays, manifest)
    return str(save_artifact(src.parent.parent / "twins", files).path)

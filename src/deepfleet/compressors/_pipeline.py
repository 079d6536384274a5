"""DeepIoT end to end on one trained model: search, extract, verify, fine-tune."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deepfleet.compressors._cost import cost_model, kept_fraction
from deepfleet.compressors._deepiot import DeepIoTConfig, SearchResult, search
from deepfleet.compressors._encoding import Encoding, kept_values
from deepfleet.compressors._export import sparse_or
from deepfleet.compressors._extract import (
    check_extraction,
    extract,
    input_masking_problem,
    rnn_layers,
)
from deepfleet.compressors._finetune import weight_names
from deepfleet.compressors._graph import Structure, analyse
from deepfleet.compressors._masked import masked_model, rnn_weights
from deepfleet.compressors.training import TrainConfig, device_of, logits_of, train
from deepfleet.data import Dataset
from deepfleet.errors import ConfigError, UnsupportedLayerError


@dataclass
class DeepIoTResult:
    model: nn.Module  # the extracted, fine-tuned dense model
    structure: Structure  # of the original model
    keep: list[np.ndarray]
    search: SearchResult
    extraction_error: float  # relative max |extracted - masked| on validation inputs
    kept_params: float  # fraction of the original's parameters
    kept_macs: float
    val_accuracy_search: float  # the extracted model before fine-tuning
    history: dict[str, list[float]] = field(default_factory=dict)
    inputs: dict[str, Any] | None = None  # InputGroups.kept() + sensors_kept, when inputs are masked


def deepiot_compress(
    base: nn.Module,
    data: Dataset,
    cfg: DeepIoTConfig,
    finetune: TrainConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> DeepIoTResult:
    """Compress the trained ``base`` (left untouched) to ``cfg.target`` of ``cfg.metric``.

    Fine-tuning distils from ``teacher`` (default ``base``) when ``finetune.kd_alpha > 0``.
    """
    from deepfleet.compressors.training import accuracy

    dev = device_of(base)
    example = torch.as_tensor(data.X_train[:2]).to(dev)
    structure = analyse_inputs(base, data, cfg.inputs, example)
    problem = input_masking_problem(structure)
    if problem is not None:
        raise UnsupportedLayerError(problem)
    masked, state = masked_model(structure)
    cm = cost_model(structure)
    search_teacher = logits_of(base, data.X_train) if cfg.distill > 0 else None
    result = search(structure, masked, state, cm, data, cfg, seed=seed, teacher_logits=search_teacher, progress=progress)
    small: nn.Module = extract(structure, masked, result.keep)
    keep_t = [torch.as_tensor(k, dtype=torch.float32, device=dev) for k in result.keep]
    err = check_extraction(masked, lambda: state.set(keep_t), small, torch.as_tensor(data.X_val[:256]).to(dev))
    val_search = accuracy(small, data.X_val, data.y_val)
    small, hist = train(small, data, finetune, seed=seed, teacher=teacher if teacher is not None else base,
                        desc="fine-tune", progress=progress)
    keep64 = [torch.as_tensor(k, dtype=torch.float64) for k in result.keep]
    inputs = None
    if structure.inputs is not None:
        inputs = structure.inputs.kept(result.keep[0])
        inputs["sensors_kept"] = kept_sensors(data, inputs)
    return DeepIoTResult(
        model=small,
        structure=structure,
        keep=result.keep,
        search=result,
        extraction_error=err,
        kept_params=float(kept_fraction(cm, keep64, "params")),
        kept_macs=float(kept_fraction(cm, keep64, "macs")),
        val_accuracy_search=val_search,
        history=hist,
        inputs=inputs,
    )


def analyse_inputs(model: nn.Module, data: Dataset, inputs: str, example: torch.Tensor) -> Structure:
    """:func:`analyse` with the input as a group when ``inputs`` is not ``none``; ConfigError
    for ``sensors`` on data that names no sensors."""
    if inputs == "sensors" and data.sensors is None:
        raise ConfigError(
            f"deepiot.inputs=sensors needs the data to name each channel's sensor, but {data.name!r} "
            "names none: add an array 'sensors' (one name per channel) to the .npz, or use "
            "deepiot.inputs=features"
        )
    return analyse(model, example, inputs=inputs, sensors=data.sensors if inputs == "sensors" else None)


def kept_sensors(data: Dataset, inputs: dict[str, Any]) -> list[str] | None:
    """The sensors (in the data's order) behind the kept inputs; None when the data names none."""
    if data.sensors is None:
        return None
    if inputs["unit"] == "element":
        per = int(np.prod(data.input_shape[1:])) if len(data.input_shape) > 1 else 1
        channels = {i // per for i in inputs["inputs_kept"]}
    else:
        channels = set(inputs["inputs_kept"])
    return [s for i, s in enumerate(data.sensors) if s not in data.sensors[:i]
            and any(data.sensors[c] == s for c in channels)]


def _count(mod: nn.Module) -> int:
    return int(sum(p.numel() for p in mod.parameters()))


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:  # a BatchNorm folded into its layer by a quantiser
        return None


def _out_units(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return int(mod.out_features)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return int(mod.out_channels)
    # a low-rank or separable pair (a Sequential, or its container once traced): the second's outputs
    return _out_units(list(mod.children())[-1])


def _storage(after: nn.Module, module: str, encodings: dict[str, Encoding]) -> dict[str, object]:
    """Kept weights and storage bits per weight of the weight matrices under ``module``."""
    names = [n for n in weight_names(after) if n.startswith(module + ".")]
    params = dict(after.named_parameters())
    total = sum(params[n].numel() for n in names)
    bits = sum((encodings[n].bits if n in encodings else 32.0) * params[n].numel() for n in names)
    nonzero = sum(kept_values(n, p, encodings) for n, p in params.items() if n.startswith(module + "."))
    return {"nonzero_after": nonzero, "bits_per_weight": round(bits / max(total, 1), 4)}


def _gone(model: nn.Module, lay: Any) -> list[dict[str, object]]:
    """Layer-table rows of a layer that extraction removed (it lost every input)."""
    before = model.get_submodule(lay.module)
    if lay.kind in ("lstm", "gru"):
        return [{"name": f"{lay.module}.l{i}", "kind": lay.kind, "units_before": rb.hidden_size,
                 "units_after": 0, "pruned": True, "nonzero_after": 0, "bits_per_weight": 32.0,
                 "params_before": sum(t.numel() for d in range(lay.directions) for t in rnn_weights(rb, ib, d)),
                 "params_after": 0} for i, (rb, ib) in enumerate(rnn_layers(before))]
    norms_b = sum(_count(model.get_submodule(n)) for n in lay.norms)
    return [{"name": lay.module, "kind": lay.kind, "units_before": _out_units(before), "units_after": 0,
             "params_before": _count(before) + norms_b, "params_after": 0, "pruned": True,
             "nonzero_after": 0, "bits_per_weight": 32.0}]


def _with_sparse(after: nn.Module, encodings: dict[str, Encoding], sparse: Collection[str]) -> dict[str, Encoding]:
    """``encodings`` plus the sparse storage the exporter gives the ``sparse`` parameters."""
    out = dict(encodings)
    for name, p in after.named_parameters():
        if name in sparse:
            value = p.detach().cpu().numpy().astype(np.float32)
            enc = sparse_or(encodings.get(name), value)
            if enc is not None:
                out[name] = enc
    return out


def layer_table(
    structure: Structure, before: nn.Module, after: nn.Module, *, encodings: dict[str, Encoding] | None = None,
    sparse: Collection[str] = (),
) -> list[dict[str, object]]:
    """Per layer (each recurrent layer on its own): units and parameters before and after,
    nonzero parameters after (the layer's own, BatchNorm excluded; what an encoding stores when
    it stores fewer values, such as SparseSep's atoms and codes), and storage bits per weight of
    its weight matrices (32 unless ``encodings``, or the sparse storage of the ``sparse``
    parameters, say less).

    Parameters of a layer include the BatchNorm of its chain (none once folded into the layer);
    a layer factorised into a low-rank or separable pair counts both halves.
    """
    encodings = _with_sparse(after, encodings or {}, sparse)
    names_of = {id(p): n for n, p in after.named_parameters()}
    rows: list[dict[str, object]] = []
    for lay in structure.layers:
        b, a = before.get_submodule(lay.module), _submodule(after, lay.module)
        if a is None:  # a dead layer (every input dropped): gone
            rows.extend(_gone(before, lay))
            continue
        storage = _storage(after, lay.module, encodings)
        if lay.kind in ("lstm", "gru"):
            for i, ((rb, ib), (ra, ia), g) in enumerate(zip(rnn_layers(b), rnn_layers(a), lay.groups)):
                D = 2 if rb.bidirectional else 1
                pb = sum(t.numel() for d in range(D) for t in rnn_weights(rb, ib, d))
                pa = sum(t.numel() for d in range(D) for t in rnn_weights(ra, ia, d))
                nz = sum(kept_values(names_of.get(id(t), ""), t, encodings) for d in range(D) for t in rnn_weights(ra, ia, d))
                rows.append({"name": f"{lay.module}.l{i}",
                             "kind": lay.kind, "units_before": rb.hidden_size,
                             "units_after": ra.hidden_size, "params_before": pb, "params_after": pa,
                             "pruned": g is not None, "nonzero_after": nz,
                             "bits_per_weight": storage["bits_per_weight"]})
            continue
        norms_b = sum(_count(before.get_submodule(n)) for n in lay.norms)
        norms_a = sum(_count(m) for n in lay.norms if (m := _submodule(after, n)) is not None)
        rows.append({"name": lay.module, "kind": lay.kind, "units_before": _out_units(b),
                     "units_after": _out_units(a), "params_before": _count(b) + norms_b,
                     "params_after": _count(a) + norms_a, "pruned": lay.groups[0] is not None,
                     **storage})
    return rows

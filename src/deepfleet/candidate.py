"""A candidate: what compression knows about one model, as one typed, immutable record.

Compression (:func:`deepfleet.api.compress_model`) returns it, the search's trainer passes it on
unchanged, the judge reads it, and the candidates table stores it field for field (its column
names are these field names). The original model is a candidate too (``method == "none"``).
Plain data: it crosses Ray and process boundaries and round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Candidate", "Layer"]


@dataclass(frozen=True, kw_only=True)
class Layer:
    """One prunable layer (each recurrent layer on its own): units and parameters before and
    after, whether it was pruned, its nonzero parameters and storage bits per weight after."""

    name: str
    kind: str
    units_before: int
    units_after: int
    params_before: int
    params_after: int
    pruned: bool
    nonzero_after: int
    bits_per_weight: float


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """What compression knows about one model.

    Accuracies are fractions; ``accuracy_val`` (validation split) is the one decisions use,
    ``accuracy_test`` is reported and never used to choose. ``accuracy_drop_pp`` is the
    validation drop against the original in percentage points. ``ece`` (expected calibration
    error, a fraction), ``nll`` (nats) and ``brier`` are the softmax's calibration on the
    validation split (:mod:`deepfleet.calibration`; None for records made before they
    existed). ``params``/``macs`` count the
    dense model, ``bytes`` the artifact on disk, ``kept_params`` parameters left by pruning as a
    fraction of the original's. ``node`` and ``train_seconds`` say where and how long it was
    compressed (None for the original). ``features`` are the predictor's features of its
    artifact (:func:`deepfleet.features.artifact_features`; empty when it has no ``model.onnx``).
    ``sensors_kept`` names the sensors the model still reads (None when the data names none);
    ``inputs_kept`` the input channels (or elements, see the artifact manifest's
    ``inputs_unit``) it still reads when DeepIoT masked inputs (None: all).
    """

    model: str
    data: str
    method: str  # the pipeline, e.g. "deepiot+fixedpoint"; "none" for the original
    artifact_hash: str
    accuracy_val: float
    accuracy_test: float
    accuracy_drop_pp: float
    ece: float | None = None
    nll: float | None = None
    brier: float | None = None
    params: int
    macs: int
    bytes: int
    kept_params: float
    layers: tuple[Layer, ...] = ()
    features: dict[str, float] = field(default_factory=dict)
    node: str | None = None
    train_seconds: float | None = None
    sensors_kept: tuple[str, ...] | None = None
    inputs_kept: tuple[int, ...] | None = None

    @property
    def is_original(self) -> bool:
        return self.method == "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (layers as a list of dicts)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        """The inverse of :meth:`to_dict` (unknown keys are an error: the record is versioned
        by its fields)."""
        fields = {**data, "layers": tuple(Layer(**lay) for lay in data.get("layers") or ())}
        for key in ("sensors_kept", "inputs_kept"):
            if fields.get(key) is not None:
                fields[key] = tuple(fields[key])
        return cls(**fields)

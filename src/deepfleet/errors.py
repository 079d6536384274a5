"""The one exception hierarchy of deepfleet.

Every error a user can cause is a :class:`DeepfleetError` whose message names the bad value and
the fix. The classes are picklable (plain ``args``), because Ray re-raises a worker's exception in
the driver and Optuna stores the reason of a failed trial as text.
"""

from __future__ import annotations

__all__ = [
    "DeepfleetError",
    "ConfigError",
    "DataError",
    "ModelError",
    "UnsupportedLayerError",
    "ExportError",
    "DeviceError",
    "ArtifactError",
    "ResultsError",
    "one_line",
]


class DeepfleetError(Exception):
    """Base class: a problem the user can fix; ``str(err)`` is one line saying what and how."""


class ConfigError(DeepfleetError):
    """A bad option, YAML file or key (the message names file, key, value and what is accepted)."""


class DataError(DeepfleetError):
    """A data set that cannot be used (unknown name, missing arrays, wrong shapes, NaN, labels)."""


class ModelError(DeepfleetError):
    """A model that cannot be built, loaded or run."""


class UnsupportedLayerError(ModelError):
    """A model contains a layer or operation that the compressor or exporter cannot handle."""


class ExportError(ModelError):
    """An export that cannot be written faithfully (model.onnx that cannot be converted, or
    whose onnxruntime outputs differ from the model's beyond tolerance: the message says by how
    much and at which op)."""


class DeviceError(DeepfleetError):
    """A device that cannot be reached, refused us, or failed a request (names device and cause)."""


class ArtifactError(DeepfleetError):
    """An artifact directory that is missing, corrupt (hash mismatch) or of an unknown version."""


class ResultsError(DeepfleetError):
    """A results dataset that is missing or unreadable, or a row that breaks the results schema."""


def one_line(exc: BaseException) -> str:
    """The reason of a (possibly Ray-wrapped) exception on one line: a DeepfleetError's own
    message, else its type and last line (a traceback's last line is the error)."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, DeepfleetError):
        return str(cause)
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}"

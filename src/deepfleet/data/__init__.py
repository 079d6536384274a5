"""Data sets: ``load_data(spec)`` for a built-in name (``digits``, ``sensing``, ``sensing-user``,
``audio``) or a path to an ``.npz`` file.

An ``.npz`` holds ``X_train, y_train, X_test, y_test`` and optionally ``X_val, y_val`` (when
absent, a fixed stratified 10 % of the training split becomes validation). X is ``(N, F)``
feature vectors, ``(N, C, T)`` sequences or ``(N, C, H, W)`` images; y integer labels
``0..K-1``. Optional sensing metadata: ``sensors`` (1-D strings, the sensor of each channel, or
of each feature of ``(N, F)`` data), ``sample_hz`` (scalar, for sequences) and ``window_s``
(scalar, seconds of signal behind one sample): see :class:`Dataset`.
"""

from __future__ import annotations

import functools
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from deepfleet._files import cache_dir
from deepfleet.data._dataset import (
    Dataset,
    check_arrays,
    check_labels,
    check_sensing,
    fingerprint,
    sensing_window,
    stratified_split,
)
from deepfleet.errors import DataError

__all__ = ["Dataset", "SensingInfo", "check_data", "data_names", "load_data", "sensing_info"]

_BUILTIN = ("digits", "sensing", "sensing-user", "audio")


def data_names() -> list[str]:
    return list(_BUILTIN)


_CACHE_VERSION = 3  # bump when a built-in data set's preparation changes (2, 3: sensing metadata)
_FIELDS = ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")


@functools.lru_cache(maxsize=4)
def _builtin(name: str) -> Dataset:
    """A built-in data set, prepared once and kept as .npz in the deepfleet cache.

    Preparing digits imports scikit-learn (seconds on a busy worker) and the others are
    generated (audio takes ~10 s); every Ray worker of a search would pay that again without
    the cache.
    """
    path = os.path.join(cache_dir(), "data", f"{name}-v{_CACHE_VERSION}.npz")
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as npz:
            meta = npz["meta"].item().split("\n", 2)
            sensors = tuple(str(s) for s in npz["sensors"].tolist()) if "sensors" in npz.files else None
            hz = float(npz["sample_hz"]) if "sample_hz" in npz.files else None
            return Dataset(name=name, **{k: npz[k] for k in _FIELDS}, num_classes=int(meta[0]),
                           fingerprint=meta[1], description=meta[2], sensors=sensors, sample_hz=hz)
    ds = _prepare(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    meta = np.array(f"{ds.num_classes}\n{ds.fingerprint}\n{ds.description}")
    extra = {"sensors": np.array(ds.sensors)} if ds.sensors is not None else {}
    if ds.sample_hz is not None:
        extra["sample_hz"] = np.float64(ds.sample_hz)
    np.savez(tmp, meta=meta, **{k: getattr(ds, k) for k in _FIELDS}, **extra)
    os.replace(tmp, path)  # atomic: parallel workers never read half a file
    return ds


def check_data(spec: str) -> None:
    """Raise :class:`DataError` unless ``spec`` is a built-in name or an existing ``.npz`` file
    (nothing is loaded: a study file is checked before any worker starts)."""
    if spec in _BUILTIN:
        return
    if spec.endswith(".npz") or os.sep in spec or os.path.exists(spec):
        if not os.path.isfile(spec):
            raise DataError(f"data file {spec!r} does not exist; give a path to an .npz file")
        return
    raise DataError(_unknown(spec))


def _unknown(spec: str) -> str:
    return (f"unknown data set {spec!r} given as data; use one of {', '.join(_BUILTIN)} or a path to an .npz file "
            "holding X_train, y_train, X_test, y_test (and optionally X_val, y_val)")


def _prepare(name: str) -> Dataset:
    """Build a built-in data set from its source (no cache)."""
    if name == "digits":
        from deepfleet.data._digits import load_digits28

        return load_digits28()
    if name == "audio":
        from deepfleet.data._audio import load_audio

        return load_audio()
    from deepfleet.data._sensing import load_sensing, load_sensing_user

    return load_sensing_user() if name == "sensing-user" else load_sensing()


def load_data(spec: str) -> Dataset:
    """Load a built-in data set by name or a user data set from an ``.npz`` path.

    Raises :class:`DataError` naming the problem (unknown name, missing file or arrays, wrong
    shapes, NaN, labels out of range) and how to fix it.
    """
    if spec in _BUILTIN:
        return _builtin(spec)
    if spec.endswith(".npz") or os.sep in spec or os.path.exists(spec):
        return _load_npz(spec)
    raise DataError(_unknown(spec))


@dataclass(frozen=True)
class SensingInfo:
    """What a data set says about its sensors, known without loading its arrays."""

    sensors: tuple[str, ...] | None  # per channel (or per feature of flat data)
    window_s: float | None  # seconds of signal behind one sample


def sensing_info(spec: str) -> SensingInfo:
    """The sensors and window of data set ``spec`` (a study file is checked with it before any
    worker starts: a built-in set's constants, or only the small arrays of an .npz). Raises
    DataError like :func:`load_data`."""
    if spec == "sensing":
        from deepfleet.data._sensing import RATE_HZ, SENSORS, T

        return SensingInfo(SENSORS, T / RATE_HZ)
    if spec in _BUILTIN:
        return SensingInfo(None, None)
    check_data(spec)
    try:
        with np.load(spec, allow_pickle=False) as npz:
            small = {k: npz[k] for k in ("sensors", "sample_hz", "window_s") if k in npz.files}
        with zipfile.ZipFile(spec) as zf, zf.open("X_train.npy") as f:
            # the sample shape from the array's header: X itself may be large
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(f)
            shape = tuple(int(d) for d in header[0][1:])
    except KeyError:
        raise DataError(f"{spec}: missing array X_train; an .npz data set needs X_train, y_train, "
                        "X_test, y_test") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {spec!r} as an .npz file: {exc}") from None
    sensors, hz, window = check_sensing(spec, small, shape)
    return SensingInfo(sensors, sensing_window(shape, hz, window))


def _load_npz(path: str) -> Dataset:
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist; give a path to an .npz file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path!r} as an .npz file: {exc}") from None
    required = ("X_train", "y_train", "X_test", "y_test")
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing array(s) {', '.join(missing)}; an .npz data set needs "
            f"{', '.join(required)} (and optionally X_val, y_val); it has {sorted(arrays) or 'none'}"
        )
    if ("X_val" in arrays) != ("y_val" in arrays):
        raise DataError(f"{path}: give both X_val and y_val, or neither")
    splits = {}
    for split in ("train", "val", "test"):
        if f"X_{split}" in arrays:
            splits[split] = check_arrays(path, arrays[f"X_{split}"], arrays[f"y_{split}"], split)
    shape = splits["train"][0].shape[1:]
    for split, (X, _) in splits.items():
        if X.shape[1:] != shape:
            raise DataError(
                f"{path}: X_{split} samples have shape {X.shape[1:]} but X_train samples have "
                f"{shape}; all splits must share one sample shape"
            )
    num_classes = int(splits["train"][1].max()) + 1
    check_labels(path, {s: y for s, (_, y) in splits.items()}, num_classes)
    if "val" not in splits:
        X, y = splits["train"]
        n_val = max(1, len(y) // 10)
        train, val, _ = stratified_split(y, (n_val, 0), seed=0)
        splits["train"], splits["val"] = (X[train], y[train]), (X[val], y[val])
    sensors, hz, window = check_sensing(path, arrays, tuple(int(d) for d in shape))
    (Xtr, ytr), (Xva, yva), (Xte, yte) = splits["train"], splits["val"], splits["test"]
    return Dataset(
        name=os.path.basename(path),
        X_train=Xtr,
        y_train=ytr,
        X_val=Xva,
        y_val=yva,
        X_test=Xte,
        y_test=yte,
        num_classes=num_classes,
        description=f"user data from {path}",
        fingerprint=fingerprint(Xtr, ytr, Xva, yva, Xte, yte),
        sensors=sensors,
        sample_hz=hz,
        window_s=window,
    )

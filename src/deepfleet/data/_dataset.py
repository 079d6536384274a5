"""The data-set container and the split/validation helpers every source shares."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from deepfleet.errors import DataError


@dataclass(frozen=True, eq=False)
class Dataset:
    """Fixed train / validation / test splits of one classification data set.

    ``X_*`` are float32 arrays shaped ``(N, *input_shape)``; ``y_*`` are int64 labels in
    ``[0, num_classes)``. The test split is for reporting only: no decision (early stopping,
    stop rules, search objectives) may read it.

    Sensing metadata (all optional): ``sensors`` names the sensor behind each channel (axis 1
    of ``X``; each feature of flat ``(N, F)`` data); ``sample_hz`` is the sampling rate of
    ``(N, C, T)`` sequences; ``window_s`` the seconds of signal behind one sample when it
    cannot be derived from the shape (hand-made features). They feed input masking by sensor
    and the sensing energy (:attr:`sensing_window_s`); they never change the arrays, so the
    fingerprint (the cache key of trained models) leaves them out.
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    description: str = ""
    fingerprint: str = field(default="", compare=False)
    sensors: tuple[str, ...] | None = None
    sample_hz: float | None = None
    window_s: float | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.X_train.shape[1:])

    @property
    def sensing_window_s(self) -> float | None:
        """Seconds of signal one sample needs: ``window_s`` when given, else steps / sample_hz
        for (C, T) sequences; None when the data does not say."""
        return sensing_window(self.input_shape, self.sample_hz, self.window_s)

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "train": len(self.y_train),
            "val": len(self.y_val),
            "test": len(self.y_test),
            "fingerprint": self.fingerprint,
            "sensors": list(self.sensors) if self.sensors is not None else None,
            "sample_hz": self.sample_hz,
            "window_s": self.sensing_window_s,
        }


def sensing_window(shape: tuple[int, ...], sample_hz: float | None, window_s: float | None) -> float | None:
    """Seconds of signal behind one sample of ``shape``: ``window_s``, or T / ``sample_hz`` for
    (C, T) samples; None otherwise."""
    if window_s is not None:
        return float(window_s)
    if sample_hz is not None and len(shape) == 2:
        return shape[1] / float(sample_hz)
    return None


def fingerprint(*arrays: np.ndarray) -> str:
    """sha256 (first 16 hex digits) of the arrays' bytes: a cache key for trained models."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def stratified_split(
    y: np.ndarray, sizes: tuple[int, int], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) with ``sizes = (val, test)`` drawn per class in proportion."""
    rng = np.random.default_rng(seed)
    n_val, n_test = sizes
    order = rng.permutation(len(y))
    # Interleave classes so that taking a prefix is close to stratified.
    by_class = [order[y[order] == c] for c in np.unique(y)]
    interleaved = []
    longest = max(len(b) for b in by_class)
    for i in range(longest):
        interleaved.extend(int(b[i]) for b in by_class if i < len(b))
    idx = np.asarray(interleaved)
    test, val, train = idx[:n_test], idx[n_test : n_test + n_val], idx[n_test + n_val :]
    return np.sort(train), np.sort(val), np.sort(test)


def split_standardised(name: str, X: np.ndarray, y: np.ndarray, sizes: tuple[int, int], seed: int,
                       *, per_channel: bool, **fields) -> Dataset:
    """A built-in data set from all its samples: a stratified split (``sizes``: validation, test;
    :func:`stratified_split`), standardised with training statistics only (per channel, axis 1
    of (N, C, T) samples, or one mean and deviation), fingerprinted; ``fields``: the rest of
    :class:`Dataset` (num_classes, description, sensing metadata)."""
    train, val, test = stratified_split(y, sizes, seed)
    if per_channel:
        mean = X[train].mean(axis=(0, 2), keepdims=True)
        std = X[train].std(axis=(0, 2), keepdims=True)
    else:
        mean, std = float(X[train].mean()), float(X[train].std())
    X = ((X - mean) / std).astype(np.float32)
    return Dataset(name=name, X_train=X[train], y_train=y[train], X_val=X[val], y_val=y[val],
                   X_test=X[test], y_test=y[test], fingerprint=fingerprint(X, y), **fields)


def check_arrays(source: str, X: np.ndarray, y: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one split; return float32 X and int64 y. Raises DataError naming the problem."""
    if X.ndim not in (2, 3, 4):
        raise DataError(
            f"{source}: X_{split} has shape {X.shape}; expected (N, F) feature vectors, "
            "(N, C, T) sequences or (N, C, H, W) images"
        )
    if y.ndim != 1 or len(y) != len(X):
        raise DataError(
            f"{source}: y_{split} has shape {y.shape} but X_{split} has {len(X)} samples; "
            f"y_{split} must be a 1-D array of {len(X)} labels"
        )
    if len(X) == 0:
        raise DataError(f"{source}: split {split!r} is empty; give it at least one sample")
    if not np.issubdtype(X.dtype, np.number):
        raise DataError(f"{source}: X_{split} has dtype {X.dtype}; it must be numeric")
    Xf = X.astype(np.float32)
    if not np.isfinite(Xf).all():
        bad = int((~np.isfinite(Xf)).any(axis=tuple(range(1, X.ndim))).sum())
        raise DataError(
            f"{source}: X_{split} holds NaN or infinite values in {bad} samples; "
            "remove or impute them before compressing"
        )
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise DataError(
                f"{source}: y_{split} has dtype {y.dtype}; labels must be integers 0..K-1"
            )
    return Xf, y.astype(np.int64)


def check_labels(source: str, splits: dict[str, np.ndarray], num_classes: int) -> None:
    for split, y in splits.items():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{source}: y_{split} has labels in [{lo}, {hi}] but the training labels define "
                f"{num_classes} classes 0..{num_classes - 1}; relabel to 0..K-1 with every "
                "class present in y_train"
            )


def check_sensing(source: str, arrays: dict[str, np.ndarray], shape: tuple[int, ...]
                  ) -> tuple[tuple[str, ...] | None, float | None, float | None]:
    """The optional ``sensors``, ``sample_hz`` and ``window_s`` of an .npz, checked against the
    sample ``shape``; DataError naming the array and the fix."""
    sensors = None
    channels = shape[0]
    if "sensors" in arrays:
        names = arrays["sensors"]
        if names.dtype.kind not in "US" or names.ndim != 1:
            raise DataError(f"{source}: array 'sensors' has dtype {names.dtype} and shape {names.shape}; "
                            "give a 1-D array of strings, one sensor name per channel "
                            "(e.g. np.array(['acc'] * 3 + ['gyro'] * 3))")
        if len(names) != channels:
            what = "features" if len(shape) == 1 else "channels (axis 1 of X)"
            raise DataError(f"{source}: array 'sensors' has {len(names)} names but the samples have "
                            f"{channels} {what}; give one sensor name per channel")
        sensors = tuple(str(n.decode() if isinstance(n, bytes) else n) for n in names.tolist())
        if any(not n.strip() for n in sensors):
            raise DataError(f"{source}: array 'sensors' holds an empty name; name every channel's sensor")
    values = {}
    for key in ("sample_hz", "window_s"):
        if key not in arrays:
            values[key] = None
            continue
        a = arrays[key]
        ok = a.ndim == 0 and np.issubdtype(a.dtype, np.number) and np.isfinite(a) and float(a) > 0
        if not ok:
            raise DataError(f"{source}: array {key!r} is {a!r}; give a positive scalar "
                            f"(np.float64({'50.0' if key == 'sample_hz' else '2.56'}))")
        values[key] = float(a)
    hz, window = values["sample_hz"], values["window_s"]
    if hz is not None and len(shape) != 2:
        raise DataError(f"{source}: array 'sample_hz' applies to (N, C, T) sequences, but the samples "
                        f"have shape {shape}; give 'window_s' (seconds of signal behind one sample) instead")
    if hz is not None and window is not None and abs(shape[1] / hz - window) > 1e-6 * window:
        raise DataError(f"{source}: 'window_s' {window} disagrees with T / sample_hz = {shape[1]} / {hz} "
                        f"= {shape[1] / hz:.6g} s; give one of them")
    return sensors, hz, window

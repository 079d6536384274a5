from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepfleet.data import SensingInfo, load_data, sensing_info
from deepfleet.data._sensing import CLASSES, generate
from deepfleet.errors import DataError


def test_digits_are_28x28_with_fixed_disjoint_splits(digits) -> None:
    assert digits.input_shape == (1, 28, 28)
    assert (len(digits.y_train), len(digits.y_val), len(digits.y_test)) == (1097, 200, 500)
    # disjoint: no test image appears in train (compare raw bytes of each sample)
    train = {x.tobytes() for x in digits.X_train}
    assert not any(x.tobytes() in train for x in digits.X_test)
    assert set(np.unique(digits.y_test)) == set(range(10))
    again = load_data("digits")
    assert again.fingerprint == digits.fingerprint


def test_sensing_is_seeded_multiclass_and_device_dependent() -> None:
    X, y = generate(n=600, seed=1)
    X2, y2 = generate(n=600, seed=1)
    X3, _ = generate(n=600, seed=2)
    assert X.shape == (600, 6, 64) and len(CLASSES) >= 6
    assert np.array_equal(X, X2) and np.array_equal(y, y2)
    assert not np.array_equal(X, X3)
    assert set(np.unique(y)) == set(range(len(CLASSES)))
    # the accelerometer sees gravity: its magnitude is about 1 g for a sitting user
    sit = X[y == 0, :3]
    assert 0.8 < np.linalg.norm(sit, axis=1).mean() < 1.2


def _npz(tmp_path: Path, **arrays) -> str:
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return str(p)


def _good(n: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "X_train": rng.normal(size=(n, 3, 16)).astype(np.float32),
        "y_train": np.arange(n) % 4,
        "X_test": rng.normal(size=(8, 3, 16)).astype(np.float32),
        "y_test": np.arange(8) % 4,
    }


def test_npz_without_validation_gets_a_fixed_split(tmp_path: Path) -> None:
    d = load_data(_npz(tmp_path, **_good(40)))
    assert d.input_shape == (3, 16) and d.num_classes == 4
    assert len(d.y_val) == 4 and len(d.y_train) == 36


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda a: a.pop("y_test"), "missing array(s) y_test"),
        (lambda a: a.update(X_test=a["X_test"][:, :, :8]), "all splits must share one sample shape"),
        (lambda a: a.update(X_train=a["X_train"][:, 0, 0]), "expected (N, F) feature vectors, (N, C, T)"),
        (lambda a: a["X_train"].__setitem__((3, 0, 0), np.nan), "NaN or infinite values in 1 samples"),
        (lambda a: a.update(y_test=a["y_test"] + 4), "labels in [4, 7]"),
        (lambda a: a.update(y_train=a["y_train"][:5]), "y_train has shape (5,)"),
        (lambda a: a.update(X_val=a["X_train"][:4]), "give both X_val and y_val"),
    ],
)
def test_bad_npz_is_rejected_with_the_problem_named(tmp_path: Path, change, needle: str) -> None:
    arrays = _good()
    change(arrays)
    with pytest.raises(DataError) as err:
        load_data(_npz(tmp_path, **arrays))
    assert needle in str(err.value)


def test_flat_feature_vectors_and_sensing_metadata_load(tmp_path: Path) -> None:
    a = _good(40)
    a.update(X_train=a["X_train"].reshape(40, -1), X_test=a["X_test"].reshape(8, -1),
             sensors=np.array(["acc"] * 24 + ["gyro"] * 24), window_s=np.float64(2.5))
    d = load_data(_npz(tmp_path, **a))
    assert d.input_shape == (48,) and d.sensors == ("acc",) * 24 + ("gyro",) * 24
    assert d.sensing_window_s == 2.5 and d.sample_hz is None
    b = _good(40)
    b.update(sensors=np.array(["acc", "acc", "mic"]), sample_hz=np.float64(8.0))
    path = _npz(tmp_path, **b)
    d = load_data(path)
    assert d.sensing_window_s == 16 / 8.0 and d.summary()["sensors"] == ["acc", "acc", "mic"]
    info = sensing_info(path)  # the same, without loading X
    assert info.sensors == ("acc", "acc", "mic") and info.window_s == 2.0


def test_the_sensing_set_names_its_sensors_and_window() -> None:
    d = load_data("sensing")
    assert d.sensors == ("accelerometer",) * 3 + ("gyroscope",) * 3
    assert d.sample_hz == 50.0 and d.sensing_window_s == 64 / 50.0
    assert sensing_info("sensing") == SensingInfo(d.sensors, 64 / 50.0)
    assert sensing_info("digits") == SensingInfo(None, None)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"sensors": np.array(["acc", "gyro"])}, "array 'sensors' has 2 names but the samples have 3 channels"),
        ({"sensors": np.array([1, 2, 3])}, "array 'sensors' has dtype int64"),
        ({"sample_hz": np.float64(-1)}, "array 'sample_hz' is"),
        ({"sample_hz": np.float64(8), "window_s": np.float64(3.0)}, "'window_s' 3.0 disagrees with T / sample_hz"),
    ],
)
def test_bad_sensing_metadata_names_the_array_and_the_fix(tmp_path: Path, extra: dict, needle: str) -> None:
    path = _npz(tmp_path, **_good(), **extra)
    with pytest.raises(DataError) as err:
        load_data(path)
    assert needle in str(err.value)
    with pytest.raises(DataError, match=needle.split(" ")[0]):
        sensing_info(path)


def test_unknown_names_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data set 'mnist'"):
        load_data("mnist")
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "absent.npz"))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_data(str(tmp_path / "junk.npz"))

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepfleet.data import SensingInfo, _audio, _sensing, data_names, load_data, sensing_info
from deepfleet.data._dataset import fingerprint
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


def test_the_activity_set_is_unchanged_by_the_user_variant() -> None:
    # pinned before sensing-user existed: the gait traits come from their own random stream
    X, y = generate(n=600, seed=1)
    assert fingerprint(X, y) == "e21d8068723ab03c"


def _nearest_centroid_accuracy(X: np.ndarray, labels: np.ndarray, classes: int) -> float:
    """Accuracy on the second half of a nearest-centroid rule fitted on the first half, on
    standardised spectra of every channel: a weak reader of per-class signatures."""
    F = np.abs(np.fft.rfft(X, axis=2)).reshape(len(X), -1)  # (n, 6 * 33)
    F = (F - F.mean(0)) / (F.std(0) + 1e-9)
    half = len(X) // 2
    centroids = np.stack([F[:half][labels[:half] == k].mean(0) for k in range(classes)])
    pred = np.argmin(((F[half:, None] - centroids[None]) ** 2).sum(-1), 1)
    return float((pred == labels[half:]).mean())


def test_sensing_user_labels_users_of_moving_windows_who_differ_in_gait() -> None:
    X, y = _sensing.generate_users(n=900, seed=2)
    assert X.shape == (900, 6, 64) and set(np.unique(y)) == set(range(_sensing.N_USERS))
    assert np.array_equal(X, _sensing.generate_users(n=900, seed=2)[0])
    moving = tuple(CLASSES.index(c) for c in _sensing.USER_ACTIVITIES)
    settings = dict(pocket_jitter_deg=_sensing.USER_POCKET_JITTER_DEG, activities=moving)
    _, activity, _ = _sensing.simulate(900, 2, _sensing.DIFFICULTY, gait=_sensing.USER_GAIT, **settings)
    assert set(np.unique(activity)) == set(moving)
    # the gait signatures are what makes users recognisable once the pocket orientation varies
    plain = _sensing.simulate(2000, 3, _sensing.DIFFICULTY, gait=0.0, **settings)
    gait = _sensing.simulate(2000, 3, _sensing.DIFFICULTY, gait=_sensing.USER_GAIT, **settings)
    acc_plain = _nearest_centroid_accuracy(plain[0], plain[2], _sensing.N_USERS)
    acc_gait = _nearest_centroid_accuracy(gait[0], gait[2], _sensing.N_USERS)
    assert acc_gait > acc_plain + 0.08, (acc_plain, acc_gait)


def test_audio_is_seeded_balanced_log_mel_windows() -> None:
    X, y = _audio.generate(n=96, seed=1)
    assert X.shape == (96, _audio.N_MELS, _audio.CONTEXT) == (96, 24, 8) and X.dtype == np.float32
    assert np.bincount(y).tolist() == [12] * len(_audio.CLASSES)
    X2, y2 = _audio.generate(n=96, seed=1)
    assert np.array_equal(X, X2) and np.array_equal(y, y2)
    assert not np.array_equal(X, _audio.generate(n=96, seed=2)[0])
    assert np.isfinite(X).all()
    # silence is the room tone alone: the quietest class
    level = [X[y == c].mean() for c in range(len(_audio.CLASSES))]
    assert int(np.argmin(level)) == _audio.CLASSES.index("silence")


def _band_centres() -> np.ndarray:
    fb = _audio.mel_filterbank()
    hz = np.arange(fb.shape[1]) * _audio.RATE_HZ / _audio.N_FFT
    return (fb * hz).sum(1) / fb.sum(1)  # (N_MELS,)


def test_log_mel_puts_a_tone_in_its_band_and_orders_noise_colours() -> None:
    fb = _audio.mel_filterbank()
    assert fb.shape == (24, 129) and ((fb > 0).sum(1) >= 1).all()  # no empty band
    centres = _band_centres()
    t = np.arange(_audio.WINDOW) / _audio.RATE_HZ
    tone = _audio.log_mel(np.sin(2 * np.pi * 1000 * t)[None])  # (1, 24, 8)
    assert tone.shape == (1, 24, 8)
    assert int(tone[0].mean(1).argmax()) == int(np.abs(centres - 1000).argmin())
    rng = np.random.default_rng(0)
    noise = _audio._noise(rng, np.repeat([0.0, 1.0, 2.0], 10), _audio.WINDOW)  # white, pink, brown
    spectra = _audio.log_mel(noise).mean(2)  # (30, 24)
    slopes = [np.polyfit(np.log(centres), spectra[i : i + 10].mean(0), 1)[0] for i in (0, 10, 20)]
    # power per mel band vs log frequency: each step of beta tilts the spectrum down by ~1
    assert slopes[0] > slopes[1] + 0.7 > slopes[2] + 1.4, slopes


def _pitch(x: np.ndarray) -> float:
    """Autocorrelation pitch (Hz) of the loudest 40 ms of x, searched in 60-400 Hz."""
    start = max(range(0, len(x) - 320, 80), key=lambda i: float((x[i : i + 320] ** 2).sum()))
    seg = x[start : start + 320]
    ac = np.correlate(seg, seg, "full")[len(seg) - 1 :]
    lo, hi = _audio.RATE_HZ // 400, _audio.RATE_HZ // 60
    return _audio.RATE_HZ / (lo + int(np.argmax(ac[lo:hi])))


def test_speech_is_voiced_at_the_talkers_pitch() -> None:
    rng = np.random.default_rng(0)
    f0 = np.repeat([120.0, 220.0], 9)
    x = _audio.speech(rng, f0, np.repeat([1.0, 1.17], 9))  # (18, CLIP)
    assert x.shape == (18, _audio.CLIP) and np.allclose(x.std(1), 1)
    male, female = np.median([_pitch(v) for v in x[:9]]), np.median([_pitch(v) for v in x[9:]])
    assert abs(male / 120 - 1) < 0.15 and abs(female / 220 - 1) < 0.15, (male, female)


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
    with pytest.raises(DataError, match="unknown data set 'mnist'") as err:
        load_data("mnist")
    assert data_names() == ["digits", "sensing", "sensing-user", "audio"]
    assert f"use one of {', '.join(data_names())} or a path" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "absent.npz"))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_data(str(tmp_path / "junk.npz"))

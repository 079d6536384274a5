"""The Backend contract: every runtime the agent measures in passes the same tests.

One parametrized fixture gives each implementation (numpy, onnxruntime, torch, litert) loaded
from the same artifact; a runtime that cannot be imported here is skipped with the reason. The numpy
runtime (the format's reference) is the oracle for the outputs.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfleet.artifact import Artifact
from deepfleet.device_agent.backends import BACKEND_CLASSES, BACKEND_FILES, Backend
from deepfleet.device_agent.format import ArtifactCorrupt
from deepfleet.device_agent.protocol import BACKENDS, AgentError
from deepfleet.device_agent.runtime import load_model
from tests.conftest import LITERT_SKIP, TINY_SHAPE, tiny_model, tiny_tflite

# The torch backend loads TorchScript (deprecated in torch 2.13): what small devices' torch runs.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")

@pytest.fixture(scope="module")
def runtimes_artifact(tiny_artifact: Artifact, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny artifact with every backend's own file next to it (same hash):
    model.onnx is the artifact's own (its sha256 is in the manifest), model.ts is traced,
    model.tflite converted (when the extra deepfleet[litert] is installed)."""
    art = tmp_path_factory.mktemp("runtimes") / tiny_artifact.path.name
    shutil.copytree(tiny_artifact.path, art)
    model = tiny_model()
    example = torch.zeros(1, *TINY_SHAPE)
    assert (art / BACKEND_FILES["onnxruntime"]).is_file()  # written with every artifact
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is what small devices load
        warnings.simplefilter("ignore")
        torch.jit.trace(model, example).save(str(art / BACKEND_FILES["torch"]))
    tflite = tiny_tflite()
    if tflite is not None:
        (art / BACKEND_FILES["litert"]).write_bytes(tflite)
    return art


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, runtimes_artifact: Path) -> Backend:
    """Each implementation of Backend, loaded from :func:`runtimes_artifact`."""
    name = request.param
    if name == "litert" and not (runtimes_artifact / BACKEND_FILES["litert"]).is_file():
        pytest.skip(LITERT_SKIP)
    try:
        __import__({"litert": "ai_edge_litert"}.get(name, name))
    except Exception as exc:  # ImportError, or a broken install failing on import
        pytest.skip(f"backend {name!r}: `import {name}` fails here ({type(exc).__name__}: {exc})")
    return BACKEND_CLASSES[name](str(runtimes_artifact))


def _outputs(backend: Backend, x: np.ndarray) -> list[np.ndarray]:
    return backend.numpy_outputs(backend.run(backend.prepare(x)))


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *TINY_SHAPE), dtype=np.float32)


def test_every_protocol_backend_has_an_implementation() -> None:
    assert set(BACKEND_CLASSES) == set(BACKENDS)
    assert all(issubclass(cls, Backend) and cls.name == name for name, cls in BACKEND_CLASSES.items())


def test_a_backend_without_its_abstract_methods_cannot_be_made() -> None:
    class Half(Backend):
        def run(self, prepared: object) -> object:
            return prepared

    with pytest.raises(TypeError, match="abstract"):
        Half()  # type: ignore[abstract]


def test_it_describes_what_it_runs(backend: Backend, runtimes_artifact: Path) -> None:
    assert isinstance(backend, Backend) and backend.name in BACKENDS
    assert tuple(backend.input_shape) == TINY_SHAPE
    if backend.name in BACKEND_FILES:  # its own file, which the artifact hash does not cover
        data = (runtimes_artifact / BACKEND_FILES[backend.name]).read_bytes()
        assert backend.file_sha256 == hashlib.sha256(data).hexdigest()
    else:
        assert backend.file_sha256 is None


@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_equal_the_numpy_reference(backend: Backend, runtimes_artifact: Path,
                                           batch: int) -> None:
    x = _batch(batch)
    reference = load_model(str(runtimes_artifact)).run(x)
    outs = _outputs(backend, x)
    assert len(outs) == 1 and outs[0].shape == (batch, 5)
    assert isinstance(outs[0], np.ndarray) and outs[0].dtype == np.float32
    np.testing.assert_allclose(outs[0], reference, rtol=1e-4, atol=1e-5)
    assert np.abs(reference).max() > 0.1  # a real comparison, not of zeros


def test_a_prepared_input_can_be_run_again_with_the_same_result(backend: Backend) -> None:
    x = _batch(2, seed=1)
    keep = x.copy()
    prepared = backend.prepare(x)
    first = backend.numpy_outputs(backend.run(prepared))
    second = backend.numpy_outputs(backend.run(prepared))  # the timed loop reruns one input
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(x, keep)  # the caller's batch is not changed


def test_thread_control_reports_what_is_in_effect(backend: Backend, runtimes_artifact: Path) -> None:
    threads, note = backend.threads()
    assert (threads is None or (isinstance(threads, int) and threads >= 1)) and note
    got, note = backend.set_threads(1)
    assert got in (1, None) and isinstance(note, str) and note
    if got is not None:  # a runtime that reports its threads reports the new count
        assert backend.threads()[0] == 1
    x = _batch(2, seed=2)  # and still computes the same thing
    np.testing.assert_allclose(_outputs(backend, x)[0], load_model(str(runtimes_artifact)).run(x),
                               rtol=1e-4, atol=1e-5)


def test_a_missing_runtime_file_is_refused(backend: Backend, runtimes_artifact: Path,
                                           tmp_path: Path) -> None:
    art = tmp_path / runtimes_artifact.name
    shutil.copytree(runtimes_artifact, art)
    own = BACKEND_FILES.get(backend.name, "weights.npz")  # numpy runs from the weights
    (art / own).unlink()
    with pytest.raises((AgentError, ArtifactCorrupt), match=own):
        type(backend)(str(art))

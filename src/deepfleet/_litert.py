"""``model.tflite``: the torch model converted by litert-torch for LiteRT (TensorFlow Lite), the
runtime of 32-bit Raspberry Pi users (``tflite-runtime`` 2.14 has armv7l wheels; ``ai-edge-litert``
serves aarch64 and x86), and the check that LiteRT agrees with torch.

Optional: the converter comes with the extra ``pip install 'deepfleet[litert]'`` (litert-torch,
~1.2 GB with jax and the MLIR converter; a host-only dependency: devices need only the runtime).
Without it :func:`available` is False and artifacts have no ``model.tflite``.

Unlike ``model.onnx`` (built from the artifact graph, ``deepfleet._onnx``) the file is traced from
the torch module, so it is checked against that module: its outputs on validation samples must
equal torch's within :data:`TOLERANCE`, the float tolerance of ``model.onnx``. The batch is fixed
at 1 by the conversion (litert-torch 0.10 does not convert a dynamic batch of these models: the
flatten bakes the sample's batch into a RESHAPE); the agent runs a larger batch sample by sample.
Conversion is deterministic (same module -> same bytes, checked on every zoo model).

This module imports torch only in the function that converts (the driver imports it lazily).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepfleet._onnx import TOLERANCE_FLOAT as TOLERANCE  # as for a float model.onnx
from deepfleet._onnx import _rel_err
from deepfleet.errors import ExportError

INSTALL_HINT = "pip install 'deepfleet[litert]'"


@dataclass(frozen=True)
class TfliteModel:
    """A converted model: ``data`` (the file's bytes) and ``info`` for the manifest."""

    data: bytes
    info: dict[str, Any]


def available() -> bool:
    """True when the converter (litert-torch) and a LiteRT interpreter are installed."""
    return importlib.util.find_spec("litert_torch") is not None and _interpreter_class() is not None


def _interpreter_class() -> Any:
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        with contextlib.suppress(ImportError):
            return __import__(module, fromlist=["Interpreter"]).Interpreter
    return None


def run_tflite(data: bytes, x: np.ndarray) -> list[np.ndarray]:
    """The model's outputs on the float32 batch ``x``, one sample at a time (batch-1 model)."""
    interpreter = _interpreter_class()(model_content=data, num_threads=1)
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    outputs = [o["index"] for o in interpreter.get_output_details()]
    rows: list[list[np.ndarray]] = [[] for _ in outputs]
    for i in range(len(x)):
        interpreter.set_tensor(index, np.ascontiguousarray(x[i:i + 1], dtype=np.float32))
        interpreter.invoke()
        for row, o in zip(rows, outputs, strict=True):
            row.append(interpreter.get_tensor(o).copy())
    return [np.concatenate(r) for r in rows]


def export_tflite(net: Any, input_shape: tuple[int, ...], *, x: np.ndarray,
                  expected: list[np.ndarray], against: str = "torch") -> TfliteModel:
    """Convert the torch module ``net`` (eval mode, CPU) for one sample of ``input_shape`` to a
    batch-1 ``.tflite`` and check it: LiteRT's outputs on ``x`` (validation samples) must equal
    ``expected`` (the module's own outputs) within :data:`TOLERANCE` of the largest output.
    Raises ExportError naming the maximum error, or the converter's failure and the fix."""
    import importlib.metadata as md

    import torch

    sample = (torch.zeros((1, *input_shape), dtype=torch.float32),)
    captured = io.StringIO()  # the converter's import notes and progress lines: not the CLI's
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import litert_torch

            data = bytes(litert_torch.convert(net.cpu().eval(), sample).model_content())
    except Exception as exc:  # the converter raises many kinds: one clear error
        raise ExportError(
            f"litert-torch cannot convert this model to model.tflite ({type(exc).__name__}: "
            f"{str(exc)[:300]}); uninstall litert-torch to export artifacts without model.tflite"
        ) from None
    outs = run_tflite(data, np.asarray(x, dtype=np.float32))
    err = 0.0
    for out, ref in zip(outs, expected, strict=True):
        ref = np.asarray(ref, dtype=np.float32)
        if out.shape != ref.shape:
            raise ExportError(f"model.tflite gives an output of shape {list(out.shape)}, but "
                              f"{against} gives {list(ref.shape)}")
        err = max(err, _rel_err(out, ref))
    if err > TOLERANCE:
        raise ExportError(
            f"model.tflite differs from {against}: max |LiteRT - {against}| is {err:.3g} of the "
            f"largest output, but must stay within {TOLERANCE:g}; uninstall litert-torch to "
            "export artifacts without model.tflite"
        )
    return TfliteModel(data, {"batch": 1, "converter": "litert-torch " + md.version("litert-torch"),
                              "weights": "float32", "activations": "float32"})

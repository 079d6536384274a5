"""Model zoo and user models: ``build_model(spec, input_shape=..., num_classes=...)``.

``spec`` is a zoo name (``mlp``, ``lenet5``, ``vgg``, ``bilstm``, ``deepsense``, ``deepear``) or
``module:function`` naming a callable that returns a ``torch.nn.Module``; it is called with the
keyword arguments ``input_shape`` (no batch axis) and ``num_classes`` where its signature takes
them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from deepfleet.errors import ModelError
from deepfleet.models._zoo import ZOO

__all__ = ["ZOO", "build_model", "check_model", "zoo_names"]


def zoo_names() -> list[str]:
    return sorted(ZOO)


def _resolve(spec: str) -> Callable[..., Any]:
    if spec in ZOO:
        return ZOO[spec]
    if ":" not in spec:
        raise ModelError(
            f"unknown model {spec!r}; use one of {', '.join(zoo_names())} "
            "or 'module:function' naming a function that returns a torch.nn.Module"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"cannot import module {module_name!r} of model {spec!r}: {exc}; "
            "check the name and that it is on PYTHONPATH"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelError(f"module {module_name!r} has no callable {attr!r} (model {spec!r})")
    return fn


def check_model(spec: str) -> None:
    """Raise :class:`ModelError` unless ``spec`` names a zoo model or an importable callable
    (nothing is built: a study file is checked before any worker starts)."""
    _resolve(spec)


def build_model(spec: str, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model named by ``spec`` for samples of ``input_shape`` and ``num_classes``.

    Raises :class:`ModelError` for an unknown name, an import failure, or a callable that does
    not return an ``nn.Module``.
    """
    fn = _resolve(spec)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {}
    for key, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if key in params or takes_kwargs:
            kwargs[key] = value
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {spec!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model

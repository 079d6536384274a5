"""deepfleet: compress neural networks for small sensing devices and prove it on real hardware."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "compress"]


def compress(model: str, **kwargs: Any) -> dict[str, Any]:
    """Compress a model with DeepIoT; see :func:`deepfleet.api.compress` for the arguments."""
    from deepfleet.api import compress as _compress  # lazy: ``import deepfleet`` stays light

    return _compress(model, **kwargs)

"""Validation of compressor settings: each check raises ConfigError stating the rule and value."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from deepfleet.errors import ConfigError


def check_bits(method: str, bits: int, allowed: tuple[int, int], *, key: str = "bits") -> None:
    low, high = allowed
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= high:
        raise ConfigError(f"{method} supports {key} in {low}..{high}, but got {bits!r}")


def check_choice(method: str, key: str, value: Any, *, choices: Collection[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{method}: {key} must be one of {', '.join(map(repr, choices))}, but got {value!r}")


def check_fraction(method: str, key: str, value: float, *, closed_low: bool = False) -> None:
    ok = (0 <= value <= 1) if closed_low else (0 < value <= 1)
    if not isinstance(value, (int, float)) or not ok:
        interval = "[0, 1]" if closed_low else "(0, 1]"
        raise ConfigError(f"{method}: {key} must be in {interval}, but got {value!r}")


def check_positive(method: str, key: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{method}: {key} must be {rule}, but got {value!r}")


def check_layer_keys(method: str, key: str, given: Mapping[str, Any], *, names: Collection[str]) -> None:
    """Per-layer settings must name layers (or weight tensors) of the model being compressed."""
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(
            f"{method}: {key} names {', '.join(map(repr, unknown))}, which the model does not have; "
            f"layers and weights it has: {', '.join(sorted(names))}"
        )

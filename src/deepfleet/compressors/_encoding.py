"""Weight encodings: how a quantiser tells the exporter to store a tensor.

An :class:`Encoding` holds the arrays (integer codes, indices, codebooks) and plain attributes
of one weight tensor in the artifact format; the device runtime's ``decode_tensor`` is the one
definition of what they mean, and :meth:`Encoding.decode` calls it, so the float weights a
quantiser puts into its torch model are, by construction, the ones the device computes with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deepfleet.device_agent.format import decode_tensor

# Roles of an encoding's arrays, per encoding (the keys of the artifact's tensor entry that name
# arrays in weights.npz); every other attribute is plain JSON.
ARRAY_ROLES = {
    "fixed": ("codes",),
    "scaled": ("codes", "scale"),
    "codebook": ("codebook", "indices"),
    "pq": ("codebooks", "indices"),
    "rq": ("codebooks", "indices"),
    "binary": ("bits",),
}


@dataclass(frozen=True, kw_only=True)
class Encoding:
    """One weight tensor in a compact encoding.

    ``kind`` is an artifact encoding (a key of :data:`ARRAY_ROLES`), ``arrays`` maps its roles
    to arrays, ``attrs`` holds the plain-JSON fields (``frac_bits``, ``packed``, ``dim``,
    ``scale`` ...), ``shape`` the decoded shape and ``bits`` the storage bits per weight
    (codebooks included) for reports.
    """

    kind: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)
    bits: float = 32.0

    def __post_init__(self) -> None:
        roles = ARRAY_ROLES.get(self.kind)
        if roles is None:
            raise ValueError(f"unknown encoding {self.kind!r}; known: {sorted(ARRAY_ROLES)}")
        if set(self.arrays) != set(roles):
            raise ValueError(f"encoding {self.kind!r} needs arrays {roles}, got {sorted(self.arrays)}")

    def spec(self, name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The artifact's tensor entry for weight ``name`` and its arrays, named ``name.role``."""
        entry: dict[str, Any] = {"encoding": self.kind, "shape": list(self.shape), **self.attrs}
        arrays = {}
        for role, value in self.arrays.items():
            entry[role] = f"{name}.{role}"
            arrays[f"{name}.{role}"] = value
        return entry, arrays

    def decode(self) -> np.ndarray:
        """The float32 weights, decoded by the device runtime itself."""
        entry, arrays = self.spec("w")
        return decode_tensor("w", entry, arrays)

    def tensor(self, like: torch.Tensor) -> torch.Tensor:
        """The decoded weights as a tensor with ``like``'s dtype and device."""
        return torch.from_numpy(self.decode().copy()).to(device=like.device, dtype=like.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded arrays (what the tensor costs in weights.npz, headers aside)."""
        return int(sum(a.nbytes for a in self.arrays.values()))


def int_dtype(low: int, high: int) -> np.dtype:
    """The smallest numpy integer dtype holding every value in [low, high]."""
    for dt in (np.int8, np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dt)
        if info.min <= low and high <= info.max:
            return np.dtype(dt)
    raise ValueError(f"codes in [{low}, {high}] need more than 32 bits")


def pack_codes(codes: np.ndarray, bits: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Store integer codes compactly: bit-packed below 8 bits, else the smallest integer dtype.

    Signed codes are packed in two's complement. Returns (array, attributes for the entry):
    ``{"packed": bits}`` when packed, ``{}`` otherwise.
    """
    flat = np.asarray(codes, dtype=np.int64).reshape(-1)
    if bits >= 8 or flat.size == 0:
        low, high = (int(flat.min()), int(flat.max())) if flat.size else (0, 0)
        return flat.astype(int_dtype(low, high)), {}
    unsigned = flat & ((1 << bits) - 1)  # two's complement of negative codes
    # (n, bits) big-endian bits of each code, then 8 bits per byte
    bitmat = (unsigned[:, None] >> np.arange(bits - 1, -1, -1)) & 1
    return np.packbits(bitmat.astype(np.uint8).reshape(-1)), {"packed": bits}

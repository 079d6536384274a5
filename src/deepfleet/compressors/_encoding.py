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

from deepfleet.device_agent.format import _ints, decode_tensor

# Roles of an encoding's arrays, per encoding (the keys of the artifact's tensor entry that name
# arrays in weights.npz); every other attribute is plain JSON.
ARRAY_ROLES = {
    "float32": ("values",),  # a plain float32 array: only as a nested part of another encoding
    "fixed": ("codes",),
    "scaled": ("codes", "scale"),
    "codebook": ("codebook", "indices"),
    "pq": ("codebooks", "indices"),
    "rq": ("codebooks", "indices"),
    "binary": ("bits",),
    "sparse": ("index",),
    "factored": (),
}
# Roles that hold a nested encoding (a tensor entry of its own), per encoding.
NESTED_ROLES = {"sparse": ("values",), "factored": ("atoms", "codes")}
# Encodings that store one code per element: any subset of the elements can be stored alone.
ELEMENTWISE = ("float32", "fixed", "scaled", "codebook")


@dataclass(frozen=True, kw_only=True)
class Encoding:
    """One weight tensor in a compact encoding.

    ``kind`` is an artifact encoding (a key of :data:`ARRAY_ROLES`), ``arrays`` maps its roles
    to arrays, ``parts`` its nested encodings (``sparse``: ``values``; ``factored``: ``atoms``,
    ``codes``), ``attrs`` holds the plain-JSON fields (``frac_bits``, ``packed``, ``dim``,
    ``scale`` ...), ``shape`` the decoded shape and ``bits`` the storage bits per weight
    (codebooks and indices included) for reports. ``stored`` is the number of parameters it
    stores when that is fewer than the tensor's elements (factored: atoms + nonzero codes;
    sparse: the nonzeros), None when it stores one code per element.
    """

    kind: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)
    bits: float = 32.0
    parts: dict[str, Encoding] = field(default_factory=dict)
    stored: int | None = None

    def __post_init__(self) -> None:
        roles = ARRAY_ROLES.get(self.kind)
        if roles is None:
            raise ValueError(f"unknown encoding {self.kind!r}; known: {sorted(ARRAY_ROLES)}")
        if set(self.arrays) != set(roles):
            raise ValueError(f"encoding {self.kind!r} needs arrays {roles}, got {sorted(self.arrays)}")
        if set(self.parts) != set(NESTED_ROLES.get(self.kind, ())):
            raise ValueError(f"encoding {self.kind!r} needs parts {NESTED_ROLES.get(self.kind, ())}, "
                             f"got {sorted(self.parts)}")

    def spec(self, name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The artifact's tensor entry for weight ``name`` and its arrays, named ``name.role``
        (a float32 part is the array ``name`` itself; nested parts are entries of their own)."""
        entry: dict[str, Any] = {"encoding": self.kind, "shape": list(self.shape), **self.attrs}
        if self.kind == "float32":
            return entry, {name: np.ascontiguousarray(self.arrays["values"], dtype=np.float32)}
        arrays = {}
        for role, value in self.arrays.items():
            entry[role] = f"{name}.{role}"
            arrays[f"{name}.{role}"] = value
        for role, part in self.parts.items():
            entry[role], part_arrays = part.spec(f"{name}.{role}")
            arrays.update(part_arrays)
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
        return int(sum(a.nbytes for a in self.arrays.values()) + sum(p.nbytes for p in self.parts.values()))


def float32_encoding(values: np.ndarray) -> Encoding:
    """Plain float32 values (as a nested part of a sparse or factored encoding)."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    return Encoding(kind="float32", shape=v.shape, arrays={"values": v})


def _index_codes(gaps: np.ndarray, bits: int) -> np.ndarray:
    """Relative-index codes of ``bits`` bits for gaps >= 1 (see ``format._sparse_positions``)."""
    top = (1 << bits) - 1
    skips = (gaps - 1) // top
    codes = np.zeros(int(gaps.size + skips.sum()), np.int64)
    ends = np.cumsum(skips + 1) - 1  # where each gap's final (value-storing) code goes
    codes[ends] = gaps - skips * top
    return codes


def _index_bytes(n: int, bits: int) -> int:
    return -(-n * bits // 8) if bits < 8 else n * (1 if bits == 8 else 2)


def subset(enc: Encoding | None, dense: np.ndarray, positions: np.ndarray) -> Encoding | None:
    """The elements at flat ``positions`` of a tensor (``dense``, encoded as ``enc`` or plain
    float32 when None) as a 1-D encoding of the same kind; None when the encoding cannot store a
    subset of its elements alone (product/residual codebooks, bits, per-channel scales)."""
    if enc is None:
        return float32_encoding(dense.reshape(-1)[positions])
    if enc.kind not in ELEMENTWISE or (enc.kind == "scaled" and np.size(enc.arrays["scale"]) != 1):
        return None
    role = {"fixed": "codes", "scaled": "codes", "codebook": "indices", "float32": "values"}[enc.kind]
    if enc.kind == "float32":
        return float32_encoding(enc.arrays["values"].reshape(-1)[positions])
    entry, arrays = enc.spec("w")
    n = int(np.prod(enc.shape))
    codes = _ints(entry, arrays, role, count=n, signed=enc.kind != "codebook")[positions]
    packed, attrs = pack_codes(codes, int(enc.attrs.get("packed", 16)))
    rest = {k: v for k, v in enc.attrs.items() if k != "packed"}
    arrays_out = {**enc.arrays, role: packed}
    return Encoding(kind=enc.kind, shape=(int(positions.size),), arrays=arrays_out, attrs={**rest, **attrs})


def sparse_encoding(dense: np.ndarray, inner: Encoding | None = None) -> Encoding | None:
    """``dense`` (float32, exactly the values to store) in the ``sparse`` encoding: its nonzeros
    (stored as ``inner`` stores them, float32 when None) with relative indices of the width
    (1-8 or 16 bits) that makes the index smallest. None when ``inner`` cannot store a subset
    (see :func:`subset`). The caller compares :attr:`Encoding.nbytes` with the dense form."""
    flat = np.ascontiguousarray(dense, dtype=np.float32).reshape(-1)
    positions = np.flatnonzero(flat)
    values = subset(inner, flat, positions)
    if values is None:
        return None
    gaps = np.diff(np.concatenate(([-1], positions)))
    best = min((1, 2, 3, 4, 5, 6, 7, 8, 16), key=lambda b: _index_bytes(int(
        gaps.size + ((gaps - 1) // ((1 << b) - 1)).sum()), b))
    codes = _index_codes(gaps, best)
    packed, attrs = pack_codes(codes, best) if best < 8 else (codes.astype(np.uint8 if best == 8 else np.uint16), {})
    bits = 8.0 * (packed.nbytes + values.nbytes) / max(flat.size, 1)
    return Encoding(kind="sparse", shape=tuple(dense.shape), arrays={"index": packed},
                    attrs={"count": int(codes.size), "index_bits": best, **attrs}, parts={"values": values},
                    bits=bits, stored=int(positions.size))


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


def kept_values(name: str, p: torch.Tensor, encodings: dict[str, Encoding]) -> int:
    """Values parameter ``name`` keeps: what its encoding stores when fewer (SparseSep's atoms
    and codes, a sparse tensor's nonzeros, :attr:`Encoding.stored`), else its nonzero values."""
    enc = encodings.get(name)
    return enc.stored if enc is not None and enc.stored is not None else int((p != 0).sum())

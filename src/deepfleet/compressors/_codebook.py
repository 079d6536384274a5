"""Codebook quantisers: k-means weight sharing, product and residual quantisation.

* ``kmeans`` (Han et al., Deep Compression): per weight tensor, 1-D k-means with k = 2^bits
  centroids initialised linearly between min and max; each weight stores the index of its
  centroid. If the tensor has exact zeros (after a sparsity method), zero is a pinned centroid.
* ``pq`` (Gong et al., 2014): rows of the tensor (one per output unit, fan-in flattened) are
  split into subvectors of ``dim`` values; each subvector position has its own k-means codebook.
* ``rq`` (Gong et al., 2014): the flattened tensor is split into subvectors of ``dim`` values;
  ``stages`` codebooks, each quantising the residual the previous stages left.

Then (``finetune``) the centroids are fine-tuned with the indices fixed: a centroid's gradient
is the sum of the gradients of the weights that share it. Indices export with the smallest
integer dtype (bit-packed below 8 bits), codebooks as float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from deepfleet.compressors._checks import check_bits, check_positive
from deepfleet.compressors._encoding import Encoding, pack_codes
from deepfleet.compressors._finetune import (
    Reparam,
    finetune,
    fold_batchnorm,
    weight_names,
    with_overrides,
)
from deepfleet.compressors.base import BaseCompressor, Compressed, Context, Options
from deepfleet.data import Dataset


def kmeans_1d(x: np.ndarray, k: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars with linear initialisation (Han et al. found it best for
    weights: it keeps centroids for the rare large weights); an empty cluster moves to the value
    worst served. Returns (sorted centroids (k,), index of each value's nearest centroid)."""
    c = np.linspace(x.min(), x.max(), k) if x.size else np.zeros(k)

    def assign(c: np.ndarray) -> np.ndarray:
        return np.searchsorted((c[:-1] + c[1:]) / 2, x)  # nearest of sorted scalars

    for _ in range(iterations):
        idx = assign(c)
        counts = np.bincount(idx, minlength=k)
        new = np.where(counts > 0, np.bincount(idx, x, minlength=k) / np.maximum(counts, 1), c)
        err = np.abs(x - new[idx])
        for j in np.flatnonzero(counts == 0)[: x.size]:
            worst = int(err.argmax())
            new[j], err[worst] = x[worst], 0.0
        new = np.sort(new)
        if np.array_equal(new, c):
            break
        c = new
    return c, assign(c)


def kmeans(
    points: torch.Tensor, k: int, iterations: int, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on vectors (n, d), seeded from k distinct random points; an empty
    cluster is re-seeded with the point farthest from its centroid. Returns (codebook (k, d),
    index per point (n,))."""
    n = points.shape[0]
    pick = torch.randperm(n, generator=generator)[: min(k, n)]
    book = points[pick].clone()
    if n < k:  # fewer points than centroids: every point is its own centroid
        book = torch.cat([book, book[:1].expand(k - n, -1)])
    idx = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        dist = torch.cdist(points, book)  # (n, k)
        near, idx = dist.min(1)
        sums = torch.zeros_like(book).index_add_(0, idx, points)
        counts = torch.bincount(idx, minlength=k)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], book)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            far = int(near.argmax())
            new[j], near[far] = points[far], 0.0
        if torch.equal(new, book):
            break
        book = new
    idx = torch.cdist(points, book).argmin(1)
    return book, idx


def _rows(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(rows, S, dim): each row (output unit) split into subvectors, the last zero-padded."""
    m = w.shape[0]
    flat = w.reshape(m, -1)
    pad = (-flat.shape[1]) % dim
    return torch.nn.functional.pad(flat, (0, pad)).reshape(m, -1, dim)


def _subvectors(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(P, dim): the flattened tensor split into subvectors, the last zero-padded."""
    flat = w.reshape(-1)
    return torch.nn.functional.pad(flat, (0, (-flat.numel()) % dim)).reshape(-1, dim)


@dataclass(frozen=True, kw_only=True)
class KMeansConfig:
    bits: int = 4  # k = 2^bits centroids per tensor
    iterations: int = 50
    finetune: bool = True  # fine-tune the centroids (indices fixed)
    epochs: int | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        check_bits("kmeans", self.bits, (1, 8))
        check_positive("kmeans", "iterations", self.iterations)
        check_positive("kmeans", "epochs", self.epochs, allow_zero=True)
        check_positive("kmeans", "lr", self.lr)


@dataclass(frozen=True, kw_only=True)
class ProductConfig:
    bits: int = 4  # k = 2^bits centroids per subvector position
    dim: int = 4  # values per subvector
    iterations: int = 25
    finetune: bool = True
    epochs: int | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        check_bits("pq", self.bits, (1, 8))
        check_positive("pq", "dim", self.dim)
        check_positive("pq", "iterations", self.iterations)
        check_positive("pq", "epochs", self.epochs, allow_zero=True)
        check_positive("pq", "lr", self.lr)


@dataclass(frozen=True, kw_only=True)
class ResidualConfig:
    bits: int = 8  # k = 2^bits centroids per stage
    dim: int = 4
    stages: int = 2
    iterations: int = 25
    finetune: bool = True
    epochs: int | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        check_bits("rq", self.bits, (1, 8))
        check_bits("rq", self.stages, (1, 8), key="stages")
        check_positive("rq", "dim", self.dim)
        check_positive("rq", "iterations", self.iterations)
        check_positive("rq", "epochs", self.epochs, allow_zero=True)
        check_positive("rq", "lr", self.lr)


class CodebookWeights(Reparam):
    """Weights decoded from trainable codebooks and fixed indices (one entry per tensor).

    ``kind`` is the artifact encoding (codebook | pq | rq); ``books[name]`` the codebook tensor,
    ``index[name]`` the long index tensor; ``pinned[name]`` a codebook row held at zero.
    """

    def __init__(self, kind: str, bits: int, shapes: dict[str, tuple[int, ...]]):
        self.kind, self.bits, self.shapes = kind, bits, shapes
        self.books: dict[str, torch.Tensor] = {}
        self.index: dict[str, torch.Tensor] = {}
        self.pinned: dict[str, int] = {}

    def trainable(self) -> list[torch.Tensor]:
        return list(self.books.values())

    def decode(self, name: str, book: torch.Tensor) -> torch.Tensor:
        shape, idx = self.shapes[name], self.index[name]
        n = int(np.prod(shape))
        if self.kind == "codebook":
            return book[idx].reshape(shape)
        if self.kind == "pq":  # book (S, k, d), idx (rows, S)
            S = book.shape[0]
            sub = book[torch.arange(S)[None, :], idx]  # (rows, S, d)
            return sub.reshape(idx.shape[0], -1)[:, : n // idx.shape[0]].reshape(shape)
        acc = book[0][idx[0]]  # rq: book (T, k, d), idx (T, P); summed stage by stage
        for t in range(1, book.shape[0]):
            acc = acc + book[t][idx[t]]
        return acc.reshape(-1)[:n].reshape(shape)

    def weights(self, *, final: bool) -> dict[str, torch.Tensor]:
        if final:
            return {n: enc.tensor(self.books[n]) for n, enc in self.encodings().items()}
        return {n: self.decode(n, b) for n, b in self.books.items()}

    def after_step(self) -> None:
        with torch.no_grad():
            for n, row in self.pinned.items():
                self.books[n][row] = 0.0

    def encodings(self) -> dict[str, Encoding]:
        out = {}
        for n, book in self.books.items():
            idx = self.index[n].cpu().numpy()
            packed, attrs = pack_codes(idx, self.bits)
            b = book.detach().cpu().numpy().astype(np.float32)
            size = int(np.prod(self.shapes[n]))
            bits = (idx.size * self.bits + 32 * b.size) / size
            role = "codebook" if self.kind == "codebook" else "codebooks"
            out[n] = Encoding(kind=self.kind, shape=self.shapes[n], arrays={role: b, "indices": packed},
                              attrs=attrs, bits=bits)
        return out


class _CodebookCompressor(BaseCompressor):
    stage = "quantise"

    kind = "codebook"

    @classmethod
    def settings_from(cls, options: Options, given: Mapping[str, Any]) -> dict[str, Any]:
        return {} if options.bits is None else {"bits": options.bits}

    def fit(self, reparam: CodebookWeights, name: str, w: torch.Tensor, *, gen: torch.Generator) -> None:
        raise NotImplementedError

    def compress(self, model: nn.Module, data: Dataset, ctx: Context) -> Compressed:
        cfg = self.config
        gm = fold_batchnorm(model)
        params = dict(gm.named_parameters())
        names = weight_names(gm)
        reparam = CodebookWeights(self.kind, cfg.bits, {n: tuple(params[n].shape) for n in names})
        gen = torch.Generator().manual_seed(ctx.seed)
        for n in names:
            self.fit(reparam, n, params[n].detach().cpu().float(), gen=gen)
            reparam.books[n] = reparam.books[n].to(params[n].device).requires_grad_(True)
            reparam.index[n] = reparam.index[n].to(params[n].device)
        train_cfg = with_overrides(ctx.finetune, cfg.epochs if cfg.finetune else 0, cfg.lr)
        tuned, hist = finetune(gm, data, train_cfg, reparam=reparam, seed=ctx.seed, teacher=ctx.teacher,
                               desc=self.name, progress=ctx.progress)
        encodings = reparam.encodings()
        layers = [{"weight": n, "bits_per_weight": round(e.bits, 4), "codebook_size": 2**cfg.bits,
                   "bytes": e.nbytes} for n, e in encodings.items()]
        info = {"settings": dataclasses.asdict(cfg), "layers": layers, "epochs_trained": len(hist["val_accuracy"])}
        return Compressed(model=tuned, info=info, encodings=encodings)


class KMeans(_CodebookCompressor):
    """k-means weight sharing per tensor (Deep Compression), centroids fine-tuned."""

    name = "kmeans"
    config_class = KMeansConfig
    keeps_zeros = True
    kind = "codebook"

    def fit(self, reparam: CodebookWeights, name: str, w: torch.Tensor, *, gen: torch.Generator) -> None:
        x = w.reshape(-1).double().numpy()
        k = 2**self.config.bits
        zero = x == 0
        if zero.any():  # sparsity from an earlier method: zero is a centroid of its own, pinned
            c, idx_nz = kmeans_1d(x[~zero], k - 1, self.config.iterations) if (~zero).any() else (np.zeros(k - 1), np.zeros(0, np.int64))
            book = np.concatenate([[0.0], c])
            idx = np.zeros(x.size, np.int64)
            idx[~zero] = idx_nz + 1
            reparam.pinned[name] = 0
        else:
            book, idx = kmeans_1d(x, k, self.config.iterations)
        reparam.books[name] = torch.as_tensor(book, dtype=torch.float32)
        reparam.index[name] = torch.as_tensor(idx, dtype=torch.long)


class ProductQuantiser(_CodebookCompressor):
    """Product quantisation of each tensor's rows (one codebook per subvector position)."""

    name = "pq"
    config_class = ProductConfig
    kind = "pq"

    def fit(self, reparam: CodebookWeights, name: str, w: torch.Tensor, *, gen: torch.Generator) -> None:
        cfg: ProductConfig = self.config
        sub = _rows(w, cfg.dim)  # (rows, S, d)
        books, idx = [], []
        for s in range(sub.shape[1]):
            b, i = kmeans(sub[:, s], 2**cfg.bits, cfg.iterations, generator=gen)
            books.append(b)
            idx.append(i)
        reparam.books[name] = torch.stack(books)  # (S, k, d)
        reparam.index[name] = torch.stack(idx, 1)  # (rows, S)


class ResidualQuantiser(_CodebookCompressor):
    """Residual quantisation of each tensor's subvectors, ``stages`` codebooks deep."""

    name = "rq"
    config_class = ResidualConfig
    kind = "rq"

    def fit(self, reparam: CodebookWeights, name: str, w: torch.Tensor, *, gen: torch.Generator) -> None:
        cfg: ResidualConfig = self.config
        residual = _subvectors(w, cfg.dim)  # (P, d)
        books, idx = [], []
        for _ in range(cfg.stages):
            b, i = kmeans(residual, 2**cfg.bits, cfg.iterations, generator=gen)
            books.append(b)
            idx.append(i)
            residual = residual - b[i]
        reparam.books[name] = torch.stack(books)  # (T, k, d)
        reparam.index[name] = torch.stack(idx)  # (T, P)

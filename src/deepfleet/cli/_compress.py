"""``deepfleet compress MODEL --data DATA``: train (or reuse) a base model, compress, export."""

from __future__ import annotations

import json
from typing import Any

import click

from deepfleet.data import data_names
from deepfleet.errors import ConfigError


def parse_settings(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``("fixedpoint.act_bits=8", ...)`` -> ``{"fixedpoint": {"act_bits": 8}}``; values are
    read as JSON (numbers, true/false, null, lists, objects), anything else as a string."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, field = key.partition(".")
        if not sep or not dot or not method or not field:
            raise ConfigError(f"--set takes METHOD.KEY=VALUE (e.g. fixedpoint.act_bits=8), but got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(method.strip(), {})[field.strip()] = value
    return out


@click.command()
@click.argument("model")
@click.option("--data", "data", required=True, help=f"Data set: {', '.join(data_names())}, or a path to an .npz file.")
@click.option("--method", "method", default="deepiot", show_default=True,
              help="Compression method, or a comma list applied in order: deepiot, l1, lowrank, rdeepsense, "
                   "magnitude, dns, fixedpoint, kmeans, pq, rq, binary, sparsesep, temperature "
                   "(e.g. deepiot,fixedpoint,temperature).")
@click.option("--bits", type=int, default=None,
              help="Bits of the quantisers in the pipeline (fixedpoint 2-16, kmeans/pq/rq 1-8 per index, binary 1).")
@click.option("--rounding", type=click.Choice(["nearest", "stochastic"]), default=None,
              help="Rounding of fixedpoint (default nearest).")
@click.option("--set", "assignments", multiple=True, metavar="METHOD.KEY=VALUE",
              help="Any setting of a method in the pipeline, e.g. --set fixedpoint.act_bits=8 (repeatable).")
@click.option("--target-params", type=float, default=None,
              help="Kept fraction of the parameters to reach, in (0, 1] (default 0.01 for lenet5, else 0.05).")
@click.option("--target-macs", type=float, default=None,
              help="Kept fraction of the multiply-accumulates to reach instead, in (0, 1].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of training and compression.")
@click.option("--out", "out", type=click.Path(file_okay=False), default="runs/compress", show_default=True,
              help="Directory for the artifacts and the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--device", "torch_device", default="auto", show_default=True,
              help="Torch device for training: auto, cpu, cuda, cuda:N.")
@click.option("--quick", is_flag=True, help="Short schedules (a smoke run, not a result).")
def compress(
    model: str, data: str, method: str, bits: int | None, rounding: str | None, assignments: tuple[str, ...],
    target_params: float | None, target_macs: float | None, seed: int, out: str, as_json: bool,
    torch_device: str, quick: bool,
) -> None:
    """Compress MODEL (a zoo name or module:function) on DATA, with DeepIoT by default.

    Trains the base model unless a cached one matches, runs the methods in order (DeepIoT:
    search, extract, fine-tune; quantisers: fold BatchNorm, quantise, fine-tune), exports the
    result and the original as artifacts, and prints a per-layer table of units, parameters
    and bits before and after.
    """
    from deepfleet.api import compress as run_compress
    from deepfleet.cli._tables import compress_table

    result = run_compress(
        model, data=data, method=method, bits=bits, rounding=rounding, settings=parse_settings(assignments),
        target_params=target_params, target_macs=target_macs, seed=seed, out=out, device=torch_device,
        quick=quick, progress=not as_json,
    )
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        click.echo(compress_table(result))

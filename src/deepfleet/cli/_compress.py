"""``deepfleet compress MODEL --data DATA``: train (or reuse) a base model, compress, export."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("model")
@click.option("--data", "data", required=True, help="Data set: digits, sensing, or a path to an .npz file.")
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
    model: str, data: str, target_params: float | None, target_macs: float | None, seed: int,
    out: str, as_json: bool, torch_device: str, quick: bool,
) -> None:
    """Compress MODEL (a zoo name or module:function) with DeepIoT on DATA.

    Trains the base model unless a cached one matches, runs the compressor-critic, extracts the
    smaller dense model, fine-tunes it, exports both it and the original as artifacts, and prints
    a per-layer table of units and parameters before and after.
    """
    from deepfleet.api import compress as run_compress
    from deepfleet.report_text import compress_table

    result = run_compress(
        model, data=data, target_params=target_params, target_macs=target_macs, seed=seed,
        out=out, device=torch_device, quick=quick, progress=not as_json,
    )
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        click.echo(compress_table(result))

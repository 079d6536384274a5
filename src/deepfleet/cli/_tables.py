"""Plain-text tables for the terminal."""

from __future__ import annotations

from typing import Any


def compress_table(r: dict[str, Any]) -> str:
    """The per-layer table of a ``compress`` summary, in the layout of DeepIoT's tables."""
    head = f"{'layer':<18}{'kind':<8}{'units':>16}{'params':>22}{'nonzero':>10}{'bits':>7}"
    methods = ",".join(r.get("methods", ["deepiot"]))
    lines = [f"deepfleet compress {r['model']} on {r['data']} with {methods} (seed {r['seed']}, {r['device']})",
             head, "-" * len(head)]
    for row in r["layers"]:
        units = f"{row['units_before']} -> {row['units_after']}"
        params = f"{row['params_before']:,} -> {row['params_after']:,}"
        bits = row.get("bits_per_weight", 32)
        lines.append(f"{row['name']:<18}{row['kind']:<8}{units:>16}{params:>22}"
                     f"{row.get('nonzero_after', row['params_after']):>10,}{bits:>7.3g}")
    lines.append("-" * len(head))
    total = f"{r['params_before']:,} -> {r['params_after']:,}"
    lines.append(f"{'total':<42}{total:>22}")
    lines.append("(bits: storage bits per weight of the layer's weight matrices)")
    lines += [
        "",
        f"kept parameters  {100 * r['kept_params']:.2f} %   kept MACs {100 * r['kept_macs']:.2f} %"
        f"   (target {100 * r['target']:g} % of {r['metric']})",
        f"test accuracy    {100 * r['accuracy_before']:.2f} % -> {100 * r['accuracy_after']:.2f} %"
        f"   ({100 * (r['accuracy_after'] - r['accuracy_before']):+.2f} pp)",
        f"artifact bytes   {r['bytes_before']:,} -> {r['bytes_after']:,}",
        f"artifact         {r['artifact']}",
        f"original         {r['artifact_original']}",
        f"took             {r['seconds']:.1f} s",
    ]
    return "\n".join(lines)

"""Render a benchmark JSON (benchmarks/secagg.py --json) as the README's markdown table.

Usage: python benchmarks/table.py benchmarks/results/secagg.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _key(row: dict[str, Any]) -> tuple[int, int, int]:
    return row["d"], row["n"], row["k"]


def render(data: dict[str, Any]) -> str:
    ours = {_key(r): r for r in data["results"] if r["impl"] == "ours"}
    flower = {_key(r): r for r in data["results"] if r["impl"] == "flower" and r["variant"] == "flower-defaults"}
    flower_clip = {_key(r): r for r in data["results"] if r["impl"] == "flower" and r["variant"] == "clip-7-sigma"}
    lines = [
        "| d | n | k | ours client s | x keystream limit | Flower client s | client speed-up | ours server s "
        "| Flower server s | server x | B/param ours / Flower | rel. L2 error ours / Flower (default; 7 sigma) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for key in sorted(ours):
        o, f, fc = ours[key], flower.get(key), flower_clip.get(key)
        d, n, k = key

        def cell(value: float | None, fmt: str) -> str:
            return "—" if value is None else format(value, fmt)

        lines.append(
            "| "
            + " | ".join(
                [
                    f"{d:,}",
                    str(n),
                    str(k),
                    cell(o["client_s"], ".4f"),
                    cell(o.get("client_to_limit", o["client_s"] / o["keystream_limit_s"]), ".2f"),
                    cell(f and f["client_s"], ".3f"),
                    cell(f and f["client_s"] / o["client_s"], ".0f") + ("x" if f else ""),
                    cell(o["server_s"], ".3f"),
                    cell(f and f["server_s"], ".2f"),
                    cell(f and f["server_s"] / o["server_s"], ".0f") + ("x" if f else ""),
                    f"{o['upload_bytes_per_param']:.3f} / {cell(f and f['upload_bytes_per_param'], '.3f')}",
                    f"{o['rel_l2_error']:.1e} / {cell(f and f['rel_l2_error'], '.1e')}"
                    + (f"; {fc['rel_l2_error']:.1e}" if fc else ""),
                ]
            )
            + " |"
        )
    machine = data["machine"]
    lines.append("")
    lines.append(
        f"Machine: {machine.get('cpu_model', machine['processor'])}, {machine['cpu_count']} cores (one thread used), "
        f"Python {machine['python']}, numpy {machine['numpy']}, cryptography {machine['cryptography']}, "
        f"flwr {machine['flwr']}. Flower not run for: {', '.join(data['flower_skipped']) or 'none'}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(json.loads(Path(sys.argv[1]).read_text())))

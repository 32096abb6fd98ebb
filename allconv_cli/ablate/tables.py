"""An ablation's table as files: Markdown, CSV, JSON and a bar chart."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from allconv_cli.ablate.grid import shown
from allconv_cli.ablate.paper import paper_columns
from allconv_cli.charts import ablation_bars
from allconv_cli.util import atomic_write_text


def grid_columns(rows: list[dict]) -> list[str]:
    """The --grid settings the rows vary: their keys between "model" and "params"."""
    keys = list(rows[0])
    return keys[1:keys.index("params")]


def row_label(row: dict) -> str:
    """The network as built, 'all-cnn-c', or 'all-cnn-c, batch_size=256' for a row of a --grid combination."""
    return ", ".join([row["network"], *(f"{key}={shown(row[key])}" for key in grid_columns([row]))])


def markdown_table(rows: list[dict]) -> str:
    columns = paper_columns(rows)
    settings = grid_columns(rows)
    table3 = any(r["paper_table3"] is not None for r in rows)
    header = ["network", *settings, "params", "paper's params", "lr", "test error %",
              *(f"{label} %" for _, label in columns), f"difference from {'Table 3' if table3 else 'the paper'}"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * len(settings) + "---:|" * (len(header) - 1 - len(settings))]
    for r in rows:
        error = (f"{r['test_error_mean']:.2f} (1 seed)" if r["test_error_std"] is None
                 else f"{r['test_error_mean']:.2f} ± {r['test_error_std']:.2f} ({r['seeds']} seeds)")
        cells = [r["network"], *(shown(r[key]) for key in settings), f"{r['params']:,}", r["paper_params"] or "",
                 f"{r['lr']:g}", error]
        cells += ["" if r[key] is None else f"{r[key]:.2f}" for key, _ in columns]
        cells += ["" if r["difference"] is None else f"{r['difference']:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], out: Path):
    """table.md, table.csv, table.json and chart.png in ``out``."""

    atomic_write_text(out / "table.md", markdown_table(rows))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "table.csv", buffer.getvalue())
    atomic_write_text(out / "table.json", json.dumps(rows, indent=2))
    ablation_bars(rows, [row_label(r) for r in rows], paper_columns(rows), out / "chart.png")

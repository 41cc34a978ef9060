"""Sweeps over sequence length x parallel layout: CSV + JSON + a PNG plot.

Layouts are written as compact names: ``single`` (one rank), or any of ``tp<N>``, ``pp<N>``,
``cp<N>``, ``dp<N>`` and ``sp`` joined by ``-``/``_`` or run together, e.g. ``tp2``, ``tp2sp``,
``tp2-pp2``, ``dp2``. The number of ranks is tp·pp·cp·dp. All resolutions of one layout run in
one set of processes (start-up is paid once per layout).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lumos_mcore.perf.runner import BenchmarkSpec, json_safe, run_benchmark

__all__ = ["CSV_FIELDS", "parse_layout", "run_sweep", "write_sweep"]

_TOKEN = re.compile(r"(tp|pp|cp|dp)(\d+)|(sp)")

CSV_FIELDS = (
    "layout",
    "world_size",
    "resolution",
    "frames",
    "tokens_per_sample",
    "global_batch",
    "step_time_s",
    "samples_per_s",
    "tokens_per_s",
    "achieved_tflops",
    "peak_tflops_total",
    "mfu",
    "mfu_paired",
    "hfu",
    "threads_per_rank",
    "comm_fraction",
    "max_peak_memory_gib",
    "diffusers_ratio_step",
)


def parse_layout(name: str) -> dict[str, Any]:
    """``"tp2sp"`` -> ``{"tp": 2, "pp": 1, "cp": 1, "sequence_parallel": True, "nproc": 2}``."""
    text = name.strip().lower()
    sizes = {"tp": 1, "pp": 1, "cp": 1, "dp": 1}
    sp = False
    if text not in ("single", "1", ""):
        pos = 0
        compact = re.sub(r"[-_+,]", "", text)
        for m in _TOKEN.finditer(compact):
            if m.start() != pos:
                break
            if m.group(3):
                sp = True
            else:
                sizes[m.group(1)] = int(m.group(2))
            pos = m.end()
        if pos != len(compact) or any(v < 1 for v in sizes.values()):
            raise ValueError(
                f"layout {name!r}: write it as tp<N>, pp<N>, cp<N>, dp<N>, sp joined by '-' "
                "(e.g. tp2-sp, pp2, dp2) or 'single'"
            )
    world = sizes["tp"] * sizes["pp"] * sizes["cp"] * sizes["dp"]
    return {
        "tp": sizes["tp"],
        "pp": sizes["pp"],
        "cp": sizes["cp"],
        "sequence_parallel": sp,
        "nproc": world,
    }


def run_sweep(
    base: BenchmarkSpec,
    resolutions: list[int],
    layouts: list[str],
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark every (layout, resolution); returns the summaries in that order.

    ``on_result`` sees each summary as its layout finishes (progress output).
    """
    rows: list[dict[str, Any]] = []
    for layout in layouts:
        specs = [replace(base, resolution=r, **parse_layout(layout)) for r in resolutions]
        for summary in run_benchmark(specs):
            summary["layout_name"] = layout
            rows.append(summary)
            if on_result is not None:
                on_result(summary)
    return rows


def _csv_row(r: dict[str, Any]) -> dict[str, Any]:
    row = {k: r.get(k) for k in CSV_FIELDS}
    row["layout"] = r.get("layout_name", r["layout"])
    row["max_peak_memory_gib"] = max(r["peak_memory_gib_per_rank"])
    cmp_ = r.get("compare")
    row["diffusers_ratio_step"] = cmp_["ratio_step"] if cmp_ else None
    return row


def write_sweep(rows: list[dict[str, Any]], out_dir: str | Path, stem: str = "sweep") -> dict:
    """Write ``<stem>.csv``, ``<stem>.json`` and ``<stem>.png`` into ``out_dir``; return paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        for r in rows:
            writer.writerow(_csv_row(r))
    paths["json"].write_text(json.dumps(json_safe(rows), indent=2) + "\n")
    plot_sweep(rows, paths["png"])
    return paths


def plot_sweep(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Tokens/s and MFU against tokens per sample, one line per layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_layout: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        name = r.get("layout_name", r["layout"])
        label = f"{name} ({r['world_size']} rank x {r['threads_per_rank']} thr)"
        by_layout.setdefault(label, []).append(r)
    fig, (ax_tps, ax_mfu) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rs in by_layout.items():
        rs = sorted(rs, key=lambda r: r["tokens_per_sample"])
        seq = [r["tokens_per_sample"] for r in rs]
        ax_tps.plot(seq, [r["tokens_per_s"] for r in rs], marker="o", label=name)
        ax_mfu.plot(seq, [r["mfu"] for r in rs], marker="o", label=name)
    first = rows[0]
    device = first["device"].split(",")[0].rstrip(")") + ")"  # threads are in the legend
    title = f"{first['model']} {first['variant']} train steps, {device}, {first['precision']}"
    for ax, ylabel in ((ax_tps, "tokens / s"), (ax_mfu, f"MFU (vs {first['peak_source']})")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per sample (sequence length)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(title="layout")
    ax_mfu.set_ylim(bottom=0)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

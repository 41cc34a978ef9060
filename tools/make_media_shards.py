"""Pack images and videos into webdataset media shards with a ``lumos-media`` index.json.

Inputs (``--input``):
  * a folder: every image/video below it (sorted); a sidecar ``<name>.txt`` is the caption and a
    sidecar ``<name>.json`` may hold ``caption``, ``camera`` (a pose: nested lists or 12/16
    numbers) and any other metadata;
  * a ``.csv`` list with a ``path`` column and optional ``caption`` / ``camera`` columns (camera
    as JSON or whitespace-separated numbers); other columns go to the metadata;
  * a ``.json`` (list of objects) or ``.jsonl`` list with the same fields.
Relative paths in a list are taken from the list's folder. Each sample is probed (size, fps,
frame count, codec) and stored as is (no re-encoding). Unreadable, empty or unsupported inputs
are skipped, counted per reason and reported; ``--max-bad-fraction`` turns too many into an
error.

``--index-only DIR`` instead indexes existing webdataset shards (img2dataset / video2dataset
layout) in place.

Example:
    python tools/make_media_shards.py --input /data/clips.csv --out /data/clips_shards \
        --samples-per-shard 1000 --workers 8
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

try:
    from lumos_mcore.data.media.probe import MEDIA_EXTS, ProbeError, probe_media
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lumos_mcore.data.media.probe import MEDIA_EXTS, ProbeError, probe_media
from lumos_mcore.data.media.shards import MediaShardWriter, build_media_index

# Entry field set by list_folder when a sidecar .json is unreadable: the sample is skipped and
# counted as bad_meta by make_shards instead of aborting the listing.
_BAD_SIDECAR = "_bad_sidecar"


def _parse_camera(value: Any) -> list | None:
    """The camera pose as (nested) lists of finite floats, None when absent; raises ValueError
    or TypeError (the sample is counted as bad_meta) for anything else, e.g. null / "nan"
    entries or a dict, which the writer would otherwise reject mid-run."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else [float(v) for v in text.split()]
    if isinstance(value, dict):
        raise TypeError(f"expected a list of numbers, got an object {value!r}")
    cam = np.asarray(value, dtype=np.float64)  # null entries become NaN, caught just below
    if cam.size == 0 or not np.isfinite(cam).all():
        raise ValueError(f"expected finite numbers, got {value!r}")
    return cam.tolist()


def list_folder(root: Path) -> list[dict[str, Any]]:
    """One entry per media file below ``root`` with its sidecar caption / metadata."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ext = path.suffix.lower().lstrip(".")
        if ext not in MEDIA_EXTS:
            continue
        entry: dict[str, Any] = {"path": str(path)}
        side_json = path.with_suffix(".json")
        if side_json.is_file():
            try:
                with open(side_json, encoding="utf-8") as f:
                    side = json.load(f)
                if not isinstance(side, dict):
                    raise ValueError(f"expected a JSON object, got {type(side).__name__}")
                entry.update(side)
            except (OSError, ValueError) as e:  # JSONDecodeError / UnicodeDecodeError included
                entry[_BAD_SIDECAR] = f"{side_json.name}: {type(e).__name__}: {e}"
            entry["path"] = str(path)
        side_txt = path.with_suffix(".txt")
        if side_txt.is_file():
            entry["caption"] = side_txt.read_text(encoding="utf-8").strip()
        entries.append(entry)
    return entries


def list_file(path: Path) -> list[dict[str, Any]]:
    """Entries of a CSV / JSON / JSONL list, paths resolved against the list's folder."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif suffix == ".json":
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
    else:
        raise ValueError(f"{path}: list files are .csv, .json or .jsonl")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not row.get("path"):
            raise ValueError(f"{path}: entry {i} has no 'path'")
        p = Path(row["path"])
        row = dict(row)
        row["path"] = str(p if p.is_absolute() else path.parent / p)
        out.append(row)
    return out


def _load(entry: dict[str, Any]) -> tuple[dict[str, Any], bytes | None, Any, str | None]:
    """(entry, bytes, MediaInfo, bad reason) for one input; never raises."""
    path = Path(entry["path"])
    if entry.get(_BAD_SIDECAR):
        return entry, None, entry[_BAD_SIDECAR], "bad_meta"
    ext = path.suffix.lower().lstrip(".")
    try:
        data = path.read_bytes()
    except OSError as e:
        return entry, None, f"{type(e).__name__}: {e}", "missing_member"
    try:
        info = probe_media(data, ext)
    except ProbeError as e:
        return entry, None, e.detail, e.reason
    return entry, data, info, None


def make_shards(
    entries: list[dict[str, Any]],
    out: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    workers: int = 4,
    max_bad_fraction: float = 1.0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Probe and pack ``entries``; returns a report (written, skipped per reason, examples)."""
    skipped: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    written = 0
    with (
        MediaShardWriter(out, samples_per_shard=samples_per_shard, overwrite=overwrite) as writer,
        ThreadPoolExecutor(max(1, workers)) as pool,
    ):
        for entry, data, info, reason in pool.map(_load, entries):
            if reason is not None:
                skipped[reason] += 1
                examples.setdefault(reason, f"{entry['path']}: {info}")
                continue
            try:
                camera = _parse_camera(entry.get("camera"))
            except (ValueError, TypeError) as e:
                skipped["bad_meta"] += 1
                examples.setdefault("bad_meta", f"{entry['path']}: camera: {e}")
                continue
            extra = {k: v for k, v in entry.items() if k not in ("path", "caption", "camera")}
            extra["source"] = entry["path"]
            writer.write(
                data,  # type: ignore[arg-type]
                Path(entry["path"]).suffix,
                info=info,
                caption=entry.get("caption") or None,
                camera=camera,
                meta=extra,
            )
            written += 1
        total = written + sum(skipped.values())
        if total and sum(skipped.values()) > max_bad_fraction * total:
            raise ValueError(
                f"--max-bad-fraction={max_bad_fraction} exceeded: {sum(skipped.values())} of "
                f"{total} inputs unusable {dict(skipped)}; e.g. {examples}"
            )
    return {"written": written, "skipped": dict(skipped), "examples": examples}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="folder of media, or a .csv/.json/.jsonl list")
    src.add_argument("--index-only", help="index existing webdataset shards in this folder")
    p.add_argument("--out", help="output folder (becomes media.path)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=4, help="threads reading and probing inputs")
    p.add_argument("--max-bad-fraction", type=float, default=1.0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.index_only:
        index = build_media_index(args.index_only)
        kinds = collections.Counter(k or "unknown" for s in index.shards for k in s.kinds)
        report: dict[str, Any] = {"indexed": index.num_samples, "kinds": dict(kinds)}
    else:
        if not args.out:
            p.error("--out is required with --input")
        src_path = Path(args.input)
        entries = list_folder(src_path) if src_path.is_dir() else list_file(src_path)
        if not entries:
            p.error(f"{src_path}: no images or videos found")
        report = make_shards(
            entries,
            args.out,
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            max_bad_fraction=args.max_bad_fraction,
            overwrite=args.overwrite,
        )
    report["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

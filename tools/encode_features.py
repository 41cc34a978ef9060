"""Offline mode: encode raw media shards once into feature shards that FeatureDataset reads.

Decodes every usable sample of a media dataset (same buckets, crops, clip placement and
bad-input handling as online training), runs the frozen encoders of ``media.encoders`` and
writes ``latent`` / ``cond`` / ``cond_mask`` with the source metadata through
``FeatureShardWriter``. Train on the result with ``data.path=<out>`` (``data.kind=features``).

The media settings come from ``--config`` (a job YAML with a ``media:`` section, or a YAML of
the section itself) plus ``key=value`` overrides inside that section, e.g.:
    python tools/encode_features.py --out data/synthetic_feats path=data/synthetic_media \
        modality=image 'buckets=[[64,64]]' encoders.vae=data/tiny_encoders/vae \
        encoders.dino=data/tiny_encoders/dino encoders.cond=dino_cls
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

try:
    from lumos_mcore.config.loader import load_config
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lumos_mcore.config.loader import load_config
from lumos_mcore.config.media import MediaDataConfig
from lumos_mcore.data.features import BadSampleError
from lumos_mcore.data.media.dataset import MediaDataset
from lumos_mcore.data.shards import FeatureShardWriter
from lumos_mcore.encoders.frozen import FrozenEncoders

_META_KEYS = ("key", "width", "height", "num_frames", "fps", "codec", "class_id", "source")


def load_media_config(config: str | None, overrides: list[str]) -> MediaDataConfig:
    """``MediaDataConfig`` from a YAML (job file with ``media:`` or the bare section) + overrides."""
    section: dict[str, Any] = {}
    if config:
        with open(config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        section = loaded.get("media", loaded) if isinstance(loaded, dict) else {}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(section, f)
        tmp = f.name
    try:
        return load_config(MediaDataConfig, tmp, overrides)
    finally:
        Path(tmp).unlink()


def _plan_of(
    ds: MediaDataset, by_index: dict[int, dict[str, Any]], index: int, key: str
) -> dict[str, Any] | None:
    """The plan of batch row ``index`` / ``key``: the one given to collate, else (a decode
    replacement) re-read, so the metadata written is the encoded sample's own."""
    plan = by_index.get(index)
    if plan is not None and plan["key"] == key:
        return plan
    try:
        plan = ds.plan(index)
    except BadSampleError:  # it was just planned and decoded; only a racing rewrite gets here
        return None
    return plan if plan["key"] == key else None


def encode_dataset(
    cfg: MediaDataConfig,
    out: str,
    *,
    batch_size: int = 16,
    samples_per_shard: int = 1000,
    storage_dtype: str = "float16",
    overwrite: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """Encode every usable sample once (bucket by bucket); returns a report."""
    ds = MediaDataset(cfg)
    enc = FrozenEncoders(cfg.encoders, seed=cfg.seed)
    written: set[str] = set()
    t0 = time.perf_counter()
    extra = {
        "encoded_from": str(Path(cfg.path).resolve()),
        "encoders": {k: v for k, v in vars(cfg.encoders).items()},
        "modality": cfg.modality,
    }
    with FeatureShardWriter(
        out,
        samples_per_shard=samples_per_shard,
        storage_dtype=storage_dtype,
        overwrite=overwrite,
        extra=extra,
    ) as writer:
        for lo, hi in ds.units():
            for start in range(lo, hi, batch_size):
                plans = [ds.get_or_none(i) for i in range(start, min(start + batch_size, hi))]
                # A bad sample's replacement (or a bucket's padding repeat) is written once.
                plans = [p for p in plans if p is not None and p["key"] not in written]
                unique = list({p["key"]: p for p in plans}.values())
                if not unique:
                    continue
                raw = ds.collate(unique)
                feats = enc.encode(raw)
                # Row j of the batch is sample raw["index"][j]; it differs from the plan put in
                # when that sample failed to decode (counted in ds.bad_counts) and collate put
                # another good sample of its chunk in its place, maybe one outside `unique`.
                by_index = {p["index"]: p for p in unique}
                bucket = list(raw["pixels"].shape[2:])  # [(T,) H, W] actually encoded
                for j, key in enumerate(raw["key"]):
                    if key in written:
                        continue
                    plan = _plan_of(ds, by_index, int(raw["index"][j]), key)
                    if plan is None:
                        continue
                    meta = {k: plan["meta"][k] for k in _META_KEYS if k in plan["meta"]}
                    meta.update(caption=plan["caption"], bucket=bucket)
                    if plan["camera"] is not None:
                        meta["camera"] = plan["camera"].tolist()
                    writer.write(
                        feats["latent"][j],
                        feats["cond"][j],
                        cond_mask=feats["cond_mask"][j] if cfg.encoders.cond == "t5" else None,
                        meta=meta,
                        key=key,
                    )
                    written.add(key)
                    if limit is not None and len(written) >= limit:
                        break
                if limit is not None and len(written) >= limit:
                    break
            if limit is not None and len(written) >= limit:
                break
    seconds = time.perf_counter() - t0
    return {
        "out": str(out),
        "written": len(written),
        "bad": {k: v for k, v in ds.bad_counts.items() if v},
        "routes": {"/".join(k): v for k, v in ds.decoder.routes.items()},
        "latent_channels": enc.latent_channels,
        "cond_tokens": enc.cond_tokens,
        "cond_dim": enc.cond_dim,
        "seconds": round(seconds, 2),
        "samples_per_s": round(len(written) / max(seconds, 1e-9), 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=None, help="YAML: a job file with media:, or the section")
    p.add_argument("--out", required=True, help="feature dataset folder (becomes data.path)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--storage-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value inside the media section")
    args = p.parse_args(argv)
    cfg = load_media_config(args.config, args.overrides)
    report = encode_dataset(
        cfg,
        args.out,
        batch_size=args.batch_size,
        samples_per_shard=args.samples_per_shard,
        storage_dtype=args.storage_dtype,
        overwrite=args.overwrite,
        limit=args.limit,
    )
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

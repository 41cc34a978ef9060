"""Will this job fit? Per-GPU memory of a Lumos training job, counted from its config.

    python tools/plan_memory.py --config examples/recipes/lumos_i2v_xl2_16f_512.yaml --world-size 8
    python tools/plan_memory.py model.name=Lumos-XL/2 model.variant=i2v model.num_frames=16 \
        model.latent_size=128 --sweep-frames 4,8,16,32 --gpu-memory-gib 80

Prints the per-rank breakdown of the configured job (weights, fp32 grads, optimizer, EMA,
activations, backward working set; ``lumos_mcore.perf.memory``), the bytes one block keeps for
backward term by term, and the same job under each recompute mode (and, with
``--sweep-frames``, at other clip lengths) with a fits / does-not-fit verdict against the GPU's
memory. Nothing is built or allocated, so it runs anywhere in a second. ``key=value``
arguments override the ``model.`` / ``parallel.`` / ``train.`` sections as for
``lumos_mcore.train``; of the data / media sections only ``pack`` / ``pack_capacity`` enter the
count (the data itself need not exist here), plus, for raw-media jobs, ``media.encoders`` with
``media.buckets`` / ``num_frames`` / ``modality``: the frozen encoders' weights and encode
working set (``lumos_mcore.perf.encoder_memory``), counted from the encoders' local config.json
files; where those directories are not on this machine the plan says the encoders were left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

try:
    import lumos_mcore  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from lumos_mcore.config.loader import ConfigError, load_config_tree
from lumos_mcore.config.media import EncodersConfig, MediaDataConfig
from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.parallel import ParallelConfig
from lumos_mcore.config.train import TrainConfig
from lumos_mcore.perf.encoder_memory import estimate_encoder_memory
from lumos_mcore.perf.memory import GIB, KERNELS, MemoryEstimate, estimate_job_memory

RECOMPUTE = ("none", "selective", "full")


def _default_capacity_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return 80.0  # H100 SXM


@dataclasses.dataclass
class PlannedJob:
    """The sections of a job config that decide its memory."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    pack_capacity: int | None = None  # data.pack_capacity when data.pack is on
    encoders: EncodersConfig | None = None  # media.encoders of a raw-media job, when readable
    buckets: list[list[int]] = dataclasses.field(default_factory=list)  # media.buckets
    clip_lengths: list[int] = dataclasses.field(default_factory=lambda: [1])  # video frames
    note: str = ""  # why the frozen encoders were left out


SECTIONS = ("model", "parallel", "train")
MEDIA_KEYS = ("pack", "pack_capacity", "buckets", "num_frames", "modality")
_MEDIA_DEFAULTS = {f.name: f for f in dataclasses.fields(MediaDataConfig)}


def _media_default(name: str):
    f = _MEDIA_DEFAULTS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _encoders(job: PlannedJob, media: dict, encoders: dict) -> None:
    """Fill the job's raw-media encoder fields; a missing local directory becomes a note."""
    try:
        job.encoders = load_config_tree(EncodersConfig, encoders, [])
    except (ConfigError, ValueError) as exc:
        job.note = f"frozen encoders not counted: {exc}"
        return
    job.buckets = [list(b) for b in media.get("buckets") or _media_default("buckets")]
    video = (media.get("modality") or _media_default("modality")) == "video"
    job.clip_lengths = (
        list(media.get("num_frames") or _media_default("num_frames")) if video else [1]
    )


def load_job(config: str | None, overrides: list[str]) -> PlannedJob:
    """The memory-relevant sections of a recipe + overrides, validated as the trainer does."""
    tree: dict = {}
    if config is not None:
        with open(config, encoding="utf-8") as fh:
            tree = yaml.safe_load(fh) or {}
    # packing: data.pack (feature shards) or media.pack (raw media), same two keys
    media = dict(tree.get("media") or {})
    encoders = dict(media.pop("encoders", None) or {})
    data = {**(tree.get("data") or {}), **media}
    kept, rest = [], []
    for item in overrides:
        (kept if item.split(".", 1)[0] in SECTIONS else rest).append(item)
    for item in rest:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section == "media" and name.startswith("encoders."):
            encoders[name.split(".", 1)[1]] = yaml.safe_load(value)
            continue
        if section not in ("data", "media") or name not in MEDIA_KEYS:
            raise ConfigError(
                f"{item}: only model.*, parallel.*, train.*, data. / media.pack, pack_capacity "
                "and media.buckets, num_frames, modality, encoders.* change the memory plan"
            )
        data[name] = yaml.safe_load(value)
        if section == "media":
            media[name] = data[name]
    sections = {k: v for k, v in tree.items() if k in SECTIONS}
    job = load_config_tree(PlannedJob, sections, kept)
    if encoders:
        _encoders(job, media, encoders)
    if data.get("pack"):
        if not data.get("pack_capacity"):
            raise ConfigError("pack=true: set data. / media.pack_capacity (tokens per pack)")
        job.pack_capacity = int(data["pack_capacity"])
    return job


def _row(job: PlannedJob, est: MemoryEstimate, capacity: int, reserve: float) -> dict:
    return {
        "frames": job.model.num_frames,
        "tokens": job.pack_capacity or job.model.num_tokens,
        "recompute": job.model.recompute,
        "static_gib": est.static / GIB,
        "activations_gib": est.activations / GIB,
        "working_gib": est.working / GIB,
        "total_gib": est.total / GIB,
        "fits": est.fits(capacity, reserve),
    }


def plan(
    job: PlannedJob,
    world_size: int,
    *,
    capacity_gib: float,
    reserve: float = 0.9,
    kernels: str = "torch",
    sweep_frames: list[int] | None = None,
) -> dict:
    """The estimate of ``job`` plus the recompute (x frames) comparison rows."""
    capacity = int(capacity_gib * GIB)
    est = _estimate(job, world_size, kernels)
    rows = []
    for frames in sweep_frames or [job.model.num_frames]:
        for mode in RECOMPUTE:
            model = dataclasses.replace(job.model, num_frames=frames, recompute=mode)
            variant = dataclasses.replace(job, model=model)
            e = _estimate(variant, world_size, kernels)
            rows.append(_row(variant, e, capacity, reserve))
    return {
        "model": job.model.name,
        "variant": job.model.variant,
        "tokens": job.pack_capacity or job.model.num_tokens,
        "world_size": world_size,
        "parallel": dataclasses.asdict(job.parallel),
        "micro_batch_size": 1 if job.pack_capacity else job.train.micro_batch_size,
        "capacity_gib": capacity_gib,
        "reserve": reserve,
        "kernels": kernels,
        "num_params": est.num_params,
        "components_gib": dict(est.rows()),
        "layer_terms_mib": {k: v / 2**20 for k, v in est.layer_terms.items()},
        "in_flight": est.in_flight,
        "layers_per_stage": est.layers,
        "fits": est.fits(capacity, reserve),
        "rows": rows,
        "note": job.note,
    }


def _estimate(job: PlannedJob, world_size: int, kernels: str) -> MemoryEstimate:
    # GPU planning: ``precision: auto`` means bf16 (the CUDA default), whatever this host is.
    est = estimate_job_memory(
        job.model,
        job.parallel,
        job.train,
        world_size,
        pack_capacity=job.pack_capacity,
        bf16=job.model.precision != "fp32",
        kernels=kernels,
    )
    if job.encoders is None:
        return est
    enc = estimate_encoder_memory(
        job.encoders,
        buckets=job.buckets,
        clip_lengths=job.clip_lengths,
        micro_batch_size=1 if job.pack_capacity else job.train.micro_batch_size,
        pack_capacity=job.pack_capacity,
        patch_size=job.model.patch_size,
    )
    return dataclasses.replace(est, encoders=enc.weight_bytes, encode_working=enc.working)


def format_plan(result: dict) -> str:
    par = result["parallel"]
    layout = ", ".join(
        f"{k}={v}" for k, v in par.items() if k in ("tp", "pp", "cp", "vpp") and v is not None
    )
    lines = [
        f"{result['model']} {result['variant']}: {result['tokens']} tokens/sample, "
        f"{result['num_params'] / 1e6:.0f}M params on a rank, {result['world_size']} ranks "
        f"({layout}, sp={par['sequence_parallel']}, distributed optimizer="
        f"{par['use_distributed_optimizer']}), micro-batch {result['micro_batch_size']}, "
        f"{result['layers_per_stage']} layers/stage, {result['in_flight']} in flight",
        "",
        "| per rank | GiB |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {gib:.2f} |" for name, gib in result["components_gib"].items()]
    verdict = "fits" if result["fits"] else "does NOT fit"
    if result.get("note"):
        lines += ["", result["note"]]
    lines += [
        "",
        f"{verdict} in {result['reserve']:.0%} of {result['capacity_gib']:.0f} GiB",
        "",
        "One block, one micro-batch, kept for backward (no recompute):",
        "",
        "| term | MiB |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["layer_terms_mib"].items()]
    lines += [
        "",
        "| frames | tokens | recompute | static GiB | activations GiB | working GiB | "
        "total GiB | fits |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['frames']} | {r['tokens']} | {r['recompute']} | {r['static_gib']:.1f} | "
            f"{r['activations_gib']:.1f} | {r['working_gib']:.1f} | {r['total_gib']:.1f} | "
            f"{'yes' if r['fits'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="job recipe (YAML)")
    ap.add_argument("--world-size", type=int, default=None, help="ranks (default tp*pp*cp)")
    ap.add_argument("--gpu-memory-gib", type=float, default=None, help="default: this GPU, or 80")
    ap.add_argument("--reserve", type=float, default=0.9, help="usable fraction of the memory")
    ap.add_argument("--kernels", default="torch", choices=KERNELS, help="norm + modulate op")
    ap.add_argument("--sweep-frames", default=None, help="comma list of latent frames")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("overrides", nargs="*", help="job-config key=value overrides")
    ns = ap.parse_args(argv)
    if not 0 < ns.reserve <= 1:
        ap.error(f"--reserve={ns.reserve}: must be in (0, 1]")
    job = load_job(ns.config, ns.overrides)
    par = job.parallel
    world = ns.world_size or par.tp * par.pp * par.cp
    frames = [int(f) for f in ns.sweep_frames.split(",")] if ns.sweep_frames else None
    if frames and not job.model.is_video:
        ap.error(f"--sweep-frames: model.variant={job.model.variant!r} has no frames (use i2v)")
    result = plan(
        job,
        world,
        capacity_gib=ns.gpu_memory_gib or _default_capacity_gib(),
        reserve=ns.reserve,
        kernels=ns.kernels,
        sweep_frames=frames,
    )
    print(format_plan(result))
    if ns.json is not None:
        ns.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sample from a trained Lumos model: ``python -m lumos_mcore.sample`` (or under torchrun).

    # I2I: DINO CLS feature of an input image, 4 samples, DPM-Solver++(2M) 20 steps, CFG 4
    python -m lumos_mcore.sample --model runs/lumos_i2i_xl2_256/checkpoints \
        --image cat.png --dino /models/dinov2-base --vae /models/sd-vae-ft-ema --out samples/
    # T2I from prompts (T5 features), DDPM with learned sigma, 100 steps
    python -m lumos_mcore.sample --model export/lumos_t2i --prompt "a red fox in snow" \
        --t5 /models/flan-t5-xxl --sampler ddpm --steps 100 --cfg-scale 4.5 --vae ...
    # precomputed condition tokens, latents saved as .npy (no VAE)
    python -m lumos_mcore.sample --model model.pth --cond cond.npy --num-samples 8
    # I2V: still image -> PNG frames, GIF and MP4; NVS: image + relative camera (12 numbers)
    python -m lumos_mcore.sample --model i2v_ckpt --image first.png --dino ... --vae ...
    python -m lumos_mcore.sample --model nvs_ckpt --image view.png --camera 1,0,0,0,1,0,0,0,1,0,0,1.5

Models load through ``lumos_mcore.load_model`` (megatron checkpoints, Hugging Face folders,
``.pth``); the model is called as ``model(latents, timesteps, cond, cond_mask, **extras)``.
Diffusion settings come from the ``diffusion:`` section of ``--config`` (default: the training
``config.yaml`` found next to the checkpoint) and ``diffusion.key=value`` overrides.

Determinism: the noise of global batch ``k`` (batches of ``--batch-size`` over the
condition-major list of samples) comes from a generator seeded with ``(seed, k)``, so a seed
gives the same samples in one process or spread over ``torchrun`` ranks (each rank samples
every ``world``-th batch; rank 0 writes the outputs).

Model parallelism for long videos and large models: ``--tp N`` / ``--cp M`` (megatron backend,
under ``torchrun``) run one model on each group of ``N * M`` ranks: TP slices the weights, CP
splits each sample's tokens (attention and activations), so one clip's steps run on several
GPUs. Groups are data-parallel replicas; the samples equal a one-process run's (same seeds)::

    torchrun --nproc-per-node 8 -m lumos_mcore.sample --model i2v_ckpt --cp 4 --tp 2 \
        --image first.png --dino ... --vae ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lumos_mcore.config.diffusion import DiffusionConfig
from lumos_mcore.config.loader import load_config
from lumos_mcore.diffusion.samplers import SAMPLERS, sample

log = logging.getLogger("lumos_mcore.sample")

__all__ = [
    "Conditions",
    "ModelInfo",
    "batch_seed",
    "describe_model",
    "generate",
    "main",
    "save_grid",
    "write_outputs",
]

DEFAULT_STEPS = {"ddpm": 250, "dpm++2m": 20, "euler": 50}
VAE_DOWNSAMPLE = 8  # SD-VAE: pixels per latent pixel
_MIX = 1_000_003


# ---- what the model is -------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """The facts sampling needs about a model (from its config, overridable on the CLI)."""

    variant: str = "i2i"
    in_channels: int = 4
    out_channels: int = 8
    latent_size: int = 32
    num_frames: int = 1
    cond_tokens: int = 1
    cond_channels: int = 768
    camera_dim: int = 12
    use_size_conditioning: bool = False
    first_frame_condition: bool = True

    @property
    def is_video(self) -> bool:
        return self.variant == "i2v"

    def latent_shape(self, latent_size: int | None = None) -> tuple[int, ...]:
        """Per-sample latent shape ``[C, (T,) H, W]``."""
        s = latent_size or self.latent_size
        if self.is_video:
            return (self.in_channels, self.num_frames, s, s)
        return (self.in_channels, s, s)


def describe_model(model: torch.nn.Module, **overrides: Any) -> ModelInfo:
    """Read :class:`ModelInfo` from a megatron ``LumosDiT`` (``model_cfg``) or a diffusers-style
    model (``config``), then apply the non-None ``overrides``."""
    info = ModelInfo()
    cfg = getattr(model, "model_cfg", None)
    hf = getattr(model, "config", None)
    if cfg is not None:  # lumos_mcore.config.model.ModelConfig
        info = ModelInfo(
            variant=cfg.variant,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            latent_size=cfg.latent_size,
            num_frames=getattr(cfg, "num_frames", 1),
            cond_tokens=cfg.cond_tokens,
            cond_channels=cfg.cond_channels,
            camera_dim=getattr(cfg, "camera_dim", 12),
            use_size_conditioning=cfg.use_size_conditioning,
            first_frame_condition=getattr(cfg, "first_frame_condition", True),
        )
    elif hf is not None and hasattr(hf, "get"):  # diffusers ConfigMixin (FrozenDict)
        in_ch = int(hf.get("in_channels", 4))
        out_ch = hf.get("out_channels")
        info = ModelInfo(
            variant=hf.get("variant", "i2i"),
            in_channels=in_ch,
            out_channels=int(out_ch)
            if out_ch
            else (2 * in_ch if hf.get("learn_sigma", True) else in_ch),
            latent_size=int(hf.get("sample_size", 32)),
            num_frames=int(hf.get("num_frames", 1)),
            cond_tokens=int(hf.get("cond_tokens", 1)),
            cond_channels=int(hf.get("cond_channels", 768)),
            camera_dim=int(hf.get("camera_dim") or 12),
            use_size_conditioning=bool(hf.get("use_size_conditioning", False)),
            first_frame_condition=bool(hf.get("first_frame_condition", True)),
        )
    for key, value in overrides.items():
        if value is not None:
            setattr(info, key, value)
    return info


# ---- conditions --------------------------------------------------------------------------------


@dataclass
class Conditions:
    """One row per condition: tokens ``[N, Lc, Cc]`` (+ mask), label, and per-variant inputs."""

    cond: Tensor  # [N, Lc, Cc]
    mask: Tensor | None = None  # [N, Lc] bool, True = real token
    labels: list[str] = field(default_factory=list)
    input_latent: Tensor | None = None  # [N, C, H, W]: NVS input view / I2V first frame
    camera: Tensor | None = None  # [N, camera_dim]

    def __len__(self) -> int:
        return self.cond.shape[0]


def _load_image(path: str) -> Tensor:
    """An RGB image as ``[1, 3, H, W]`` in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]  # [1, 3, H, W]


def _resize_center(pixels: Tensor, size: int) -> Tensor:
    """Shorter side to ``size``, centre crop: ``[B, 3, H, W] -> [B, 3, size, size]``."""
    h, w = pixels.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = torch.nn.functional.interpolate(
        pixels, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
    )
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size].clamp(-1, 1)


def _read_npy(path: str, ndim: int, what: str) -> Tensor:
    arr = np.load(path)
    if arr.ndim == ndim - 1:
        arr = arr[None]
    if arr.ndim != ndim:
        raise ValueError(f"{what} {path}: expected {ndim - 1} or {ndim} dims, got {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def build_conditions(args: argparse.Namespace, info: ModelInfo, device: torch.device) -> Conditions:
    """Condition tokens from ``--cond`` (.npy), ``--image`` (DINO) or ``--prompt`` (T5)."""
    sources = [bool(args.cond), bool(args.image), bool(args.prompt or args.prompts_file)]
    if sum(sources) != 1:
        raise ValueError("give exactly one of --cond FILE.npy, --image IMG..., --prompt TEXT...")
    images: Tensor | None = None
    if args.cond:
        cond = _read_npy(args.cond, 3, "--cond").float()  # [N, Lc, Cc]
        mask = _read_npy(args.cond_mask, 2, "--cond-mask").bool() if args.cond_mask else None
        if mask is not None:
            if mask.shape[0] == 1 and cond.shape[0] > 1:
                mask = mask.expand(cond.shape[0], -1)  # one mask for every condition
            if tuple(mask.shape) != tuple(cond.shape[:2]):
                raise ValueError(
                    f"--cond-mask has shape {tuple(mask.shape)}; --cond {tuple(cond.shape)} "
                    f"needs [{cond.shape[1]}] or [{cond.shape[0]}, {cond.shape[1]}]"
                )
        labels = [f"{Path(args.cond).stem}[{i}]" for i in range(cond.shape[0])]
    elif args.image:
        if not args.dino:
            raise ValueError("--image needs --dino DIR (a local DINO / ViT model directory)")
        from lumos_mcore.encoders import FrozenDINO

        dino = FrozenDINO(args.dino, image_size=args.dino_image_size, device=device)
        # Every image at the model's resolution (what the VAE of I2V / NVS also needs).
        px = (args.latent_size or info.latent_size) * VAE_DOWNSAMPLE
        images = torch.cat([_resize_center(_load_image(p), px) for p in args.image])
        tokens = "cls" if info.cond_tokens == 1 else "patch"
        cond = dino.encode(images, tokens=tokens).cpu()  # [N, Lc, Cc]
        mask = None
        labels = [Path(p).name for p in args.image]
    else:
        if not args.t5:
            raise ValueError("--prompt needs --t5 DIR (a local T5 encoder directory)")
        from lumos_mcore.encoders import FrozenT5

        prompts = list(args.prompt or [])
        if args.prompts_file:
            prompts += [ln.strip() for ln in Path(args.prompts_file).read_text().splitlines()]
            prompts = [p for p in prompts if p]
        t5 = FrozenT5(args.t5, max_length=info.cond_tokens, device=device)
        cond, mask = t5.encode(prompts)
        cond, mask = cond.cpu(), mask.cpu()
        labels = prompts
    if tuple(cond.shape[1:]) != (info.cond_tokens, info.cond_channels):
        raise ValueError(
            f"condition tokens {tuple(cond.shape[1:])} do not fit the model's "
            f"(cond_tokens, cond_channels) = ({info.cond_tokens}, {info.cond_channels})"
        )
    conds = Conditions(cond=cond, mask=mask, labels=labels)
    if info.variant in ("nvs", "i2v"):
        conds.input_latent = _input_latent(args, info, images, len(conds))
    if info.variant == "nvs":
        conds.camera = _camera(args, info, len(conds))
    return conds


def _input_latent(
    args: argparse.Namespace, info: ModelInfo, images: Tensor | None, n: int
) -> Tensor:
    """The NVS input view / I2V first frame as a latent ``[N, C, H, W]``."""
    if args.input_latent:
        lat = _read_npy(args.input_latent, 4, "--input-latent").float()
    elif images is not None and args.vae:
        from lumos_mcore.encoders import FrozenVAE

        vae = FrozenVAE(args.vae, subfolder=args.vae_subfolder, device=args.device or "auto")
        lat = vae.encode(images).cpu()  # [N, C, h, w]
    else:
        raise ValueError(
            f"variant {info.variant!r} needs the input image as a latent: give --image with "
            "--vae DIR, or --input-latent FILE.npy"
        )
    if lat.shape[0] == 1 and n > 1:
        lat = lat.expand(n, *lat.shape[1:])
    if lat.shape[0] != n:
        raise ValueError(f"--input-latent has {lat.shape[0]} latents for {n} conditions")
    return lat


def _camera(args: argparse.Namespace, info: ModelInfo, n: int) -> Tensor:
    if args.camera_file:
        cam = _read_npy(args.camera_file, 2, "--camera-file").float()
    elif args.camera:
        cam = torch.tensor([[float(v) for v in args.camera.split(",")]])
    else:
        raise ValueError("variant 'nvs' needs --camera R11,...,R33,T1,T2,T3 or --camera-file")
    if cam.shape[1] != info.camera_dim:
        raise ValueError(
            f"camera has {cam.shape[1]} values; the model expects camera_dim={info.camera_dim}"
        )
    if cam.shape[0] == 1 and n > 1:
        cam = cam.expand(n, -1)
    return cam


# ---- sampling ----------------------------------------------------------------------------------


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of the generator of global batch ``batch_index``."""
    return (seed * _MIX + batch_index) % (2**63 - 1)


ModelCall = Callable[..., Tensor]


def _model_fn(
    model: ModelCall,
    info: ModelInfo,
    rows: dict[str, Tensor | None],
    guided: bool,
    progress: Callable[[], None] | None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``model_fn(x, t)`` for the samplers; with ``guided`` the batch is the cond half followed
    by the null-condition half (``force_drop_ids``)."""
    b = rows["cond"].shape[0]

    def rep(t: Tensor | None) -> Tensor | None:
        return None if t is None else (torch.cat([t, t]) if guided else t)

    cond, mask = rep(rows["cond"]), rep(rows["mask"])
    extras: dict[str, Tensor] = {}
    for key in ("camera", "input_latent", "resolution", "aspect_ratio"):
        if rows.get(key) is not None:
            extras[key] = rep(rows[key])
    drop = torch.zeros(2 * b if guided else b, dtype=torch.bool, device=cond.device)
    if guided:
        drop[b:] = True

    def fn(x: Tensor, t: Tensor) -> Tensor:
        if info.is_video and info.first_frame_condition:
            tf = t[:, None].repeat(1, x.shape[2])  # [B, T]: per-frame timesteps
            tf[:, 0] = 0.0  # the clean first frame is the condition
            t = tf
        out = model(x, t, cond, mask, force_drop_ids=drop, **extras)
        if progress is not None:
            progress()
        return out

    return fn


def generate(
    model: ModelCall,
    info: ModelInfo,
    conds: Conditions,
    diffusion: DiffusionConfig,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float = 4.0,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    latent_size: int | None = None,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    report: bool | None = None,
) -> dict[int, Tensor]:
    """Sample ``num_samples`` latents per condition; returns ``{batch index: latents}`` for the
    batches this rank ran (all of them with one rank).

    ``rank`` / ``world_size`` split the batches (model replicas: ranks of one TP x CP model
    pass the same values and run the same batches); ``report`` says whether this process
    shows the progress bar and warnings (default: ``rank == 0``).

    Samples are ordered condition-major (condition 0's samples first). Latents are float32 on
    CPU, ``[b, C, (T,) H, W]``; I2V samples keep the input latent as their first frame when
    the model was trained with first-frame conditioning (else frame 0 is sampled too).
    """
    device = torch.device(device)
    name = sampler or ("dpm++2m" if diffusion.objective == "ddpm" else "euler")
    n_steps = steps or DEFAULT_STEPS[name]
    guided = cfg_scale != 1.0
    total = len(conds) * num_samples
    owner = torch.arange(total) // num_samples  # condition of each sample
    n_batches = (total + batch_size - 1) // batch_size
    mine = list(range(rank, n_batches, world_size))
    report = rank == 0 if report is None else report
    bar = None
    if progress and report:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine) * n_steps, desc=f"{name} x{n_steps}", unit="step")
    shape = info.latent_shape(latent_size)
    pin_first = info.is_video and info.first_frame_condition
    if info.is_video and conds.input_latent is not None and not pin_first and report:
        log.warning(
            "the input latent is not used: this I2V model was trained without first-frame "
            "conditioning (first_frame_condition=false), frame 0 is generated like the others"
        )
    out: dict[int, Tensor] = {}
    for k in mine:
        idx = owner[k * batch_size : (k + 1) * batch_size]
        g = torch.Generator().manual_seed(batch_seed(seed, k))
        noise = torch.randn((len(idx), *shape), generator=g)  # [b, C, (T,) H, W]
        rows: dict[str, Tensor | None] = {
            "cond": conds.cond[idx].to(device),
            "mask": conds.mask[idx].to(device) if conds.mask is not None else None,
            "camera": conds.camera[idx].to(device) if conds.camera is not None else None,
        }
        known_x0 = known_mask = None
        if conds.input_latent is not None and (pin_first or not info.is_video):
            first = conds.input_latent[idx].to(device)  # [b, C, H, W]
            if info.is_video:
                known_x0 = torch.zeros((len(idx), *shape), device=device)
                known_x0[:, :, 0] = first
                known_mask = torch.zeros((1, 1, shape[1], 1, 1), dtype=torch.bool)
                known_mask[:, :, 0] = True
                known_mask = known_mask.to(device)
            else:
                rows["input_latent"] = first
        if info.use_size_conditioning:
            px = float(shape[-1] * VAE_DOWNSAMPLE)
            rows["resolution"] = torch.tensor([[px, px]], device=device).repeat(len(idx), 1)
            rows["aspect_ratio"] = torch.ones(len(idx), 1, device=device)
        fn = _model_fn(model, info, rows, guided, bar.update if bar is not None else None)
        x = sample(
            diffusion,
            fn,
            noise.to(device),
            n_steps,
            sampler=name,
            guidance_scale=cfg_scale if guided else None,
            generator=g,
            known_x0=known_x0,
            known_mask=known_mask,
        )
        out[k] = x.float().cpu()
    if bar is not None:
        bar.close()
    return out


# ---- outputs -----------------------------------------------------------------------------------


def _to_uint8(images: Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [-1, 1] -> ``[N, H, W, 3]`` uint8."""
    x = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images: np.ndarray, cols: int, path: str | Path, pad: int = 2) -> None:
    """Tile ``[N, H, W, 3]`` uint8 images row-major into one PNG (white padding)."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = im
    Image.fromarray(grid).save(path)


def _decode(vae, latents: Tensor, batch: int = 8) -> Tensor:
    """SD-VAE decode of scaled latents ``[N, C, h, w]`` -> pixels ``[N, 3, H, W]`` in [-1, 1]."""
    cfg = vae.config
    scale = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
    shift = getattr(cfg, "shift_factor", None) or 0.0
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    outs = []
    with torch.no_grad():
        for i in range(0, latents.shape[0], batch):
            z = latents[i : i + batch].to(device, dtype) / scale + shift
            outs.append(vae.decode(z).sample.float().cpu())
    return torch.cat(outs)


def _write_video(frames: np.ndarray, stem: Path, fps: int) -> list[Path]:
    """PNG frames, a GIF (Pillow) and an MP4 (PyAV: H.264, else MPEG-4 Part 2)."""
    from PIL import Image

    written = []
    frame_dir = stem.with_name(stem.name + "_frames")
    frame_dir.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(frame_dir / f"{i:03d}.png")
    written.append(frame_dir)
    gif = stem.with_suffix(".gif")
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(gif, save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)
    written.append(gif)
    try:
        import av
    except ImportError:
        log.warning("PyAV is not installed: no MP4 written for %s", stem)
        return written
    mp4 = stem.with_suffix(".mp4")
    h, w = frames.shape[1:3]
    for codec in ("libx264", "h264", "mpeg4"):
        try:
            with av.open(str(mp4), mode="w") as container:
                stream = container.add_stream(codec, rate=fps)
                stream.width, stream.height = w - w % 2, h - h % 2
                stream.pix_fmt = "yuv420p"
                for f in frames:
                    vf = av.VideoFrame.from_ndarray(f[: stream.height, : stream.width], "rgb24")
                    for packet in stream.encode(vf):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            written.append(mp4)
            break
        except Exception as err:  # codec not in this FFmpeg build: try the next
            log.info("MP4 codec %s unavailable (%s)", codec, err)
            mp4.unlink(missing_ok=True)
    return written


def write_outputs(
    latents: Tensor,
    info: ModelInfo,
    out_dir: str | Path,
    *,
    num_samples: int,
    labels: list[str],
    vae_path: str | None = None,
    vae_subfolder: str = "",
    fps: int = 8,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Save ``latents.npy``; with a VAE also per-sample PNGs and ``grid.png`` (one row per
    condition) or, for video, PNG frames + GIF + MP4 per sample. Returns what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "latents.npy", latents.numpy())
    written: dict[str, Any] = {"latents": str(out / "latents.npy")}
    if not vae_path:
        return written
    from diffusers import AutoencoderKL

    kwargs = {"subfolder": vae_subfolder} if vae_subfolder else {}
    vae = AutoencoderKL.from_pretrained(vae_path, **kwargs).to(device).eval()
    if info.is_video:
        b, c, t, h, w = latents.shape
        flat = latents.transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, C, h, w]
        pixels = _decode(vae, flat)
        frames = _to_uint8(pixels).reshape(b, t, *pixels.shape[-2:], 3)
        videos = []
        for i in range(b):
            videos += [str(p) for p in _write_video(frames[i], out / f"sample_{i:04d}", fps)]
        written["videos"] = videos
        save_grid(frames[:, 0], num_samples, out / "grid_first_frames.png")
        written["grid"] = str(out / "grid_first_frames.png")
        return written
    images = _to_uint8(_decode(vae, latents))  # [N, H, W, 3]
    from PIL import Image

    files = []
    for i, im in enumerate(images):
        path = out / f"sample_{i:04d}.png"
        Image.fromarray(im).save(path)
        files.append(str(path))
    save_grid(images, num_samples, out / "grid.png")
    written.update({"images": files, "grid": str(out / "grid.png")})
    (out / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    return written


# ---- command line ------------------------------------------------------------------------------


def find_train_config(model_path: str) -> Path | None:
    """The training ``config.yaml`` next to a checkpoint (the folder or up to two levels up)."""
    p = Path(model_path).resolve()
    for d in (p if p.is_dir() else p.parent, *list(p.parents)[:2]):
        cand = d / "config.yaml"
        if cand.is_file():
            return cand
    return None


def diffusion_config(config_path: str | None, overrides: list[str]) -> DiffusionConfig:
    """``DiffusionConfig`` from a job YAML's ``diffusion:`` section plus ``diffusion.*`` overrides."""
    import yaml

    section: dict[str, Any] = {}
    if config_path:
        with open(config_path) as f:
            section = dict((yaml.safe_load(f) or {}).get("diffusion") or {})
    items = []
    for o in overrides:
        key, _, value = o.partition("=")
        if not key.startswith("diffusion.") or not _:
            raise ValueError(f"override {o!r}: only diffusion.key=value overrides apply here")
        items.append(f"{key.removeprefix('diffusion.')}={value}")
    base = [f"{k}={json.dumps(v)}" for k, v in section.items()]
    return load_config(DiffusionConfig, None, base + items)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lumos-sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="checkpoint: mcore folder, HF folder or .pth")
    c = p.add_argument_group("condition (one of)")
    c.add_argument("--cond", help="precomputed condition tokens .npy [Lc, Cc] or [N, Lc, Cc]")
    c.add_argument("--cond-mask", help=".npy [Lc] or [N, Lc], nonzero = real token")
    c.add_argument("--image", nargs="+", help="input image(s): DINO condition (i2i, i2v, nvs)")
    c.add_argument("--dino", help="local DINO / ViT directory for --image")
    c.add_argument("--dino-image-size", type=int, default=224)
    c.add_argument("--prompt", action="append", help="text prompt (t2i); repeat for several")
    c.add_argument("--prompts-file", help="one prompt per line")
    c.add_argument("--t5", help="local T5 encoder directory for --prompt")
    c.add_argument("--input-latent", help="NVS input view / I2V first frame latent .npy")
    c.add_argument("--camera", help="NVS relative camera: 12 comma-separated numbers (R, T)")
    c.add_argument("--camera-file", help="NVS cameras .npy [12] or [N, 12]")
    s = p.add_argument_group("sampling")
    s.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: dpm++2m / euler")
    s.add_argument("--steps", type=int, default=None, help="default: 250 / 20 / 50")
    s.add_argument("--cfg-scale", type=float, default=4.0, help="1 disables guidance")
    s.add_argument("--num-samples", type=int, default=4, help="samples per condition")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--config", help="job YAML whose diffusion section to use")
    s.add_argument("--no-progress", action="store_true")
    m = p.add_argument_group("model facts (default: read from the model)")
    m.add_argument("--latent-size", type=int, default=None, help="latent side (pixels / 8)")
    m.add_argument("--num-frames", type=int, default=None, help="I2V latent frames")
    m.add_argument("--variant", choices=("i2i", "t2i", "i2v", "nvs"), default=None)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="samples", help="output folder")
    o.add_argument("--vae", help="local AutoencoderKL directory: decode to PNG (else .npy)")
    o.add_argument("--vae-subfolder", default="")
    o.add_argument("--fps", type=int, default=8, help="GIF / MP4 frame rate (I2V)")
    o.add_argument("--device", default=None, help="default: cuda when available")
    o.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    q = p.add_argument_group("model parallelism (under torchrun; megatron backend)")
    q.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per model")
    q.add_argument(
        "--cp", type=int, default=1, help="context-parallel ranks per model (splits the tokens)"
    )
    p.add_argument("overrides", nargs="*", help="diffusion.key=value (e.g. diffusion.flow_shift=3)")
    return p


def _default_loader(path: str, *, device=None, dtype=None, tp: int = 1, cp: int = 1):
    try:
        from lumos_mcore import load_model
    except ImportError as err:
        raise SystemExit(
            f"lumos_mcore.load_model is not available in this build ({err}); it loads mcore, "
            "Hugging Face and .pth checkpoints for sampling"
        ) from None
    return load_model(path, device=device, dtype=dtype, tp=tp, cp=cp)


def check_model_parallel(world: int, tp: int, cp: int) -> None:
    """Refuse a ``--tp`` / ``--cp`` layout the ranks cannot form, before anything loads."""
    for flag, size in (("--tp", tp), ("--cp", cp)):
        if size < 1:
            raise SystemExit(f"{flag}={size}: must be >= 1")
    if world % (tp * cp):
        raise SystemExit(
            f"--tp={tp} --cp={cp}: the {world} rank(s) do not split into models of tp*cp="
            f"{tp * cp} ranks; launch a multiple of {tp * cp} processes (torchrun --nproc-per-node)"
        )


def check_cp_tokens(model: torch.nn.Module, info: ModelInfo, cp: int, latent_size=None) -> None:
    """Each sample's tokens must split into equal context-parallel shares (``2 * cp`` chunks
    in the zig-zag order of the TransformerEngine spec)."""
    if cp == 1:
        return
    shape = info.latent_shape(latent_size)
    p = int(getattr(model, "patch_size", 2))
    tokens = (shape[1] if info.is_video else 1) * (shape[-2] // p) * (shape[-1] // p)
    zigzag = getattr(model, "cp_mode", "contiguous") == "zigzag"
    split = 2 * cp if zigzag else cp
    if tokens % split:
        raise SystemExit(
            f"--cp={cp}: a sample has {tokens} tokens, not a multiple of {split}"
            f"{' (2*cp, the zig-zag split of the TE spec)' if zigzag else ''}; change --cp, "
            "--latent-size or --num-frames"
        )


def _data_parallel(rank: int, world: int, tp: int, cp: int) -> tuple[int, int, bool]:
    """(model replica index, replica count, whether this rank hands in the replica's
    samples): every rank of a TP x CP group runs the same batches; replicas split them."""
    if tp * cp == 1:
        return rank, world, True
    from megatron.core import parallel_state as ps

    lead = ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), lead


def _init_ranks(device: torch.device) -> tuple[int, int]:
    """Under torchrun: join the process group (data-parallel sampling); else one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def main(argv: list[str] | None = None, *, loader: Callable[..., torch.nn.Module] | None = None):
    """Run the CLI; returns what rank 0 wrote (``{}`` on other ranks)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        from lumos_mcore.parallel.state import cuda_device_index, local_rank_from_env

        rank = int(os.environ.get("RANK", "0"))
        local = cuda_device_index(local_rank_from_env(rank), torch.cuda.device_count())
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rank, world = _init_ranks(device)
    check_model_parallel(world, args.tp, args.cp)
    config_path = args.config or find_train_config(args.model)
    diffusion = diffusion_config(str(config_path) if config_path else None, args.overrides)
    if config_path and rank == 0:
        log.info("diffusion settings from %s: %s", config_path, diffusion)
    model = (loader or _default_loader)(
        args.model, device=device, dtype=dtype, tp=args.tp, cp=args.cp
    )
    model.eval()
    info = describe_model(
        model, latent_size=args.latent_size, num_frames=args.num_frames, variant=args.variant
    )
    check_cp_tokens(model, info, args.cp, args.latent_size)
    replica, replicas, lead = _data_parallel(rank, world, args.tp, args.cp)
    if rank == 0 and args.tp * args.cp > 1:
        log.info(
            "%d model replica(s) of tp=%d x cp=%d ranks share the batches",
            replicas,
            args.tp,
            args.cp,
        )
    conds = build_conditions(args, info, device)

    def call(x, t, cond, mask, **extras):
        extras = {
            k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in extras.items()
        }
        with torch.no_grad():
            return model(x.to(dtype), t, cond.to(dtype), mask, **extras).float()

    parts = generate(
        call,
        info,
        conds,
        diffusion,
        sampler=args.sampler,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        num_samples=args.num_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        latent_size=args.latent_size,
        device=device,
        rank=replica,
        world_size=replicas,
        progress=not args.no_progress,
        report=rank == 0,
    )
    if world > 1:
        import torch.distributed as dist

        gathered: list[dict[int, Tensor]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, parts if lead else {})  # one copy per replica
        parts = {k: v for g in gathered for k, v in g.items()}
    if rank != 0:
        return {}
    latents = torch.cat([parts[k] for k in sorted(parts)])
    written = write_outputs(
        latents,
        info,
        args.out,
        num_samples=args.num_samples,
        labels=conds.labels,
        vae_path=args.vae,
        vae_subfolder=args.vae_subfolder,
        fps=args.fps,
        device=device,
    )
    log.info("wrote %s", ", ".join(f"{k}: {v}" for k, v in written.items() if k != "images"))
    return written


if __name__ == "__main__":
    main()

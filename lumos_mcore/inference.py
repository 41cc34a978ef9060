"""Model loading for sampling and evaluation: one process, or one model over TP x CP ranks.

``load_model(path)`` reads a checkpoint in any supported format — a megatron checkpoint folder
or root (saved at any TP / PP / CP layout), an HF folder of ``LumosTransformer2DModel`` / ``3DModel``, a
diffusers ``PixArtTransformer2DModel`` folder, a released Lumos ``.pth`` — and returns a module
called like the megatron ``LumosDiT``::

    model(latents [B, C, H, W] | [B, C, T, H, W], timesteps [B] | [B, T], cond [B, Lc, Cc],
          cond_mask [B, Lc] | None, *, force_drop_ids, resolution, aspect_ratio, camera,
          input_latent) -> [B, C_out, (T,) H, W]

By default (``backend="auto"`` in one process) every variant comes back as the pure-PyTorch
HF class behind that convention -- ``LumosTransformer2DModel`` (I2I, T2I, NVS) or
``LumosTransformer3DModel`` (I2V), numerically the megatron model, with no megatron and no
torch.distributed. ``backend="megatron"`` returns the megatron ``LumosDiT`` itself at
TP = PP = CP = 1, for which torch.distributed (one process, gloo on CPU) and megatron's
parallel state are started if absent. Either way ``model.model_cfg`` is the ``ModelConfig``.
``tp`` / ``cp`` spread one megatron model over several ranks (see :func:`load_model`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from lumos_mcore.config.model import ModelConfig

__all__ = ["LumosInferenceModel", "load_model"]


class LumosInferenceModel(nn.Module):
    """``LumosTransformer2DModel`` / ``LumosTransformer3DModel`` called like the megatron
    ``LumosDiT``.

    ``forward(latents [B, C, (T,) H, W], timesteps [B] | [B, T], cond [B, Lc, Cc],
    cond_mask [B, Lc] | None, *, force_drop_ids, resolution, aspect_ratio, camera,
    input_latent) -> [B, C_out, (T,) H, W]``; ``model_cfg`` is the architecture (as on
    ``LumosDiT``), ``hf_model`` the diffusers module (``save_pretrained`` works on it).
    """

    def __init__(self, hf_model: nn.Module, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.model_cfg = model_cfg

    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor,
        cond: Tensor,
        cond_mask: Tensor | None = None,
        *,
        force_drop_ids: Tensor | None = None,
        resolution: Tensor | None = None,
        aspect_ratio: Tensor | None = None,
        camera: Tensor | None = None,
        input_latent: Tensor | None = None,
    ) -> Tensor:
        want = 5 if self.model_cfg.is_video else 4
        if latents.ndim != want:
            layout = "[B, C, T, H, W]" if want == 5 else "[B, C, H, W]"
            raise ValueError(
                f"latents of shape {tuple(latents.shape)}: the {self.model_cfg.variant} model "
                f"takes {layout}"
            )
        extra = None
        if resolution is not None or aspect_ratio is not None:
            extra = {"resolution": resolution, "aspect_ratio": aspect_ratio}
        view = {}
        if self.model_cfg.variant == "nvs":
            view = {"camera": camera, "input_latent": input_latent}
        (out,) = self.hf_model(
            latents,
            timesteps,
            cond,
            encoder_attention_mask=cond_mask,
            added_cond_kwargs=extra,
            force_drop_ids=force_drop_ids,
            return_dict=False,
            **view,
        )
        return out  # [B, C_out, (T,) H, W]


def _build_hf_model(
    state_dict: dict[str, Tensor], model_config: ModelConfig, dtype: torch.dtype | None
) -> nn.Module:
    """Instantiate without random initialisation (meta device) and adopt the loaded tensors."""
    from lumos_mcore.models.common.embeddings import get_2d_sincos_pos_embed
    from lumos_mcore.models.dit.hf_adapter import (
        hf_class_name,
        hf_config_from_model_config,
        hf_model_class,
    )

    config = hf_config_from_model_config(model_config, cond_dropout_prob=0.0)
    with torch.device("meta"):
        model = hf_model_class(hf_class_name(model_config))(**config)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    grid = model.base_grid
    table = torch.zeros(0, config["hidden_size"])  # RoPE models add no table
    if model_config.pos_embed == "sincos":
        table = get_2d_sincos_pos_embed(
            config["hidden_size"],
            (grid, grid),
            base_size=model.pos_base_size,
            interpolation_scale=config["pos_interpolation_scale"],
        )
    model.pos_embed = table[None]  # [1, N, D]; a fixed buffer, not part of the checkpoint
    return model.eval()


def load_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    ema: bool = True,
    format: str | None = None,  # noqa: A002 - the CLI's word for it
    model_config: ModelConfig | None = None,
    backend: str = "auto",
    tp: int = 1,
    cp: int = 1,
) -> nn.Module:
    """Load any supported checkpoint as a model in eval mode, without grads.

    ``ema=True`` takes the EMA weights when the checkpoint stores them (else the training
    weights); ``ema=False`` the training weights. ``format`` is detected when None.
    ``model_config`` overrides the recorded / inferred architecture (a ``.pth`` records none:
    its head count defaults to hidden // 72). ``backend``: ``"hf"`` (pure PyTorch, the HF
    class of the variant), ``"megatron"`` (``LumosDiT`` in this process) or ``"auto"`` (HF in
    one process, megatron when ``tp`` / ``cp`` split the model).

    ``tp`` / ``cp`` > 1 (under torchrun, world size a multiple of ``tp * cp``) split one
    megatron model over each group of ``tp * cp`` consecutive ranks: tensor parallelism
    slices the weights, context parallelism the tokens of each sample (a long video's
    attention and activations); every rank of a group passes the same inputs and receives
    the whole prediction. Either implies the megatron backend.
    """
    from lumos_mcore.convert.pipeline import (
        convert_stream,
        parse_dtype,
        plan_conversion,
        resolve_model_config,
    )
    from lumos_mcore.convert.sources import open_source

    if backend not in ("auto", "hf", "megatron"):
        raise ValueError(f"backend={backend!r}: choose auto, hf or megatron")
    for flag, size in (("tp", tp), ("cp", cp)):
        if size < 1:
            raise ValueError(f"{flag}={size}: must be >= 1")
    if tp * cp > 1:
        if backend == "hf":
            raise ValueError(
                f"backend='hf' with tp={tp}, cp={cp}: the Hugging Face model runs in one "
                "process; model parallelism needs backend='megatron' (or 'auto')"
            )
        backend = "megatron"
    torch_dtype = parse_dtype(dtype)
    heads = model_config.num_heads_ if model_config is not None else None
    source = open_source(path, format, ema=None if ema else False, num_heads=heads)
    cfg = resolve_model_config(source, model_config)
    if backend == "auto":
        backend = "hf"
    layout = "hf" if backend == "hf" else "mcore"
    plan_conversion(source, cfg, layout)
    weights = dict(convert_stream(source, cfg, layout))
    if backend == "hf":
        from lumos_mcore.convert.megatron_io import inference_config

        hf_model = _build_hf_model(weights, cfg, torch_dtype)
        model: nn.Module = LumosInferenceModel(hf_model, inference_config(cfg))
    else:
        from lumos_mcore.convert.megatron_io import load_megatron_for_inference

        if torch_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"dtype={dtype!r}: the megatron backend runs in fp32 or bf16")
        model = load_megatron_for_inference(
            cfg, weights, bf16=torch_dtype == torch.bfloat16, tp=tp, cp=cp
        )
    del weights
    if device is not None:
        model = model.to(device)
    model.requires_grad_(False)
    return model.eval()

"""Progressive stages (256 -> 512 px): ``checkpoint.init_from`` loads only the weights of the
previous stage, restarts optimizer / schedule / step, reports keys that do not fit (non-strict)
or refuses them (strict), and yields to the new stage's own checkpoints on resubmission."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from lumos_mcore.config.model import ModelConfig
from lumos_mcore.config.train import CheckpointConfig
from tests.dist_utils import run_distributed
from tests.training.helpers import make_data, make_job


def _init(path, *, strict=True, from_ema=False, save_interval=2):
    return CheckpointConfig(
        save_interval=save_interval, init_from=str(path), init_strict=strict, init_from_ema=from_ema
    )


def _stages(rank: int, world: int, jobs: dict) -> dict:
    """Stage 1 trains; stage 2 (another resolution) starts from it, trains, is resubmitted;
    then non-strict / strict loads into models that do not fit."""
    import torch

    from lumos_mcore.training.checkpoint import read_full_weights
    from lumos_mcore.training.loop import Trainer
    from lumos_mcore.training.setup import unwrap

    out: dict = {}
    Trainer(jobs["stage1"]).run()
    ckpt_root = jobs["stage1"].checkpoint_dir
    ref, _ = read_full_weights(ckpt_root)
    ref_ema, _ = read_full_weights(ckpt_root, ema=True)

    for name in ("stage2", "stage2_ema"):
        t = Trainer(jobs[name])
        params = dict(unwrap(t.chunks[0]).named_parameters())
        want = ref_ema if name.endswith("ema") else ref
        out[name] = {
            "step": t.step,
            "ok": t.init_report.ok,
            "all_equal": all(torch.equal(p.detach(), want[n]) for n, p in params.items()),
            "names_covered": set(params) <= set(want),
            "ema_equal": all(torch.equal(t.ema.shadow[0][n], ref_ema[n]) for n in params),
        }
    t = Trainer(jobs["stage2"])
    res = t.run()
    out["stage2"]["losses"] = res.losses
    t = Trainer(jobs["stage2_resubmit"])  # its own checkpoint wins over init_from
    out["resubmit_step"] = t.step
    out["resubmit_losses"] = t.run().losses

    t = Trainer(jobs["single_lenient"])  # adaLN-single: blocks differ from adaLN-Zero's
    out["lenient"] = dataclasses.asdict(t.init_report)
    for name in ("single_strict", "narrow_strict"):
        try:
            Trainer(jobs[name])
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    t = Trainer(jobs["narrow_lenient"])
    out["narrow_lenient"] = dataclasses.asdict(t.init_report)
    return out


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    data_256 = make_data(root / "256", latent_size=8)
    data_512 = make_data(root / "512", latent_size=16)
    s1 = make_job(data_256, root / "stage1", steps=2, checkpoint=CheckpointConfig(save_interval=2))
    ckpt = s1.checkpoint_dir
    hi_res = ModelConfig(name="Lumos-Micro/2", latent_size=16, cond_channels=32)
    single = dataclasses.replace(hi_res, adaln_type="single")
    narrow = dataclasses.replace(hi_res, cond_channels=16)
    jobs = {
        "stage1": s1,
        "stage2": make_job(
            data_512, root / "stage2", steps=2, model=hi_res, checkpoint=_init(ckpt)
        ),
        "stage2_ema": make_job(
            data_512, root / "s2ema", steps=2, model=hi_res, checkpoint=_init(ckpt, from_ema=True)
        ),
        "stage2_resubmit": make_job(
            data_512, root / "stage2", steps=3, model=hi_res, checkpoint=_init(ckpt)
        ),
        "single_lenient": make_job(
            data_512, root / "sl", model=single, checkpoint=_init(ckpt, strict=False)
        ),
        "single_strict": make_job(data_512, root / "ss", model=single, checkpoint=_init(ckpt)),
        "narrow_strict": make_job(data_512, root / "ns", model=narrow, checkpoint=_init(ckpt)),
        "narrow_lenient": make_job(
            data_512, root / "nl", model=narrow, checkpoint=_init(ckpt, strict=False)
        ),
    }
    (res,) = run_distributed(_stages, 1, jobs, timeout=300)
    return root, res


def test_stage2_starts_from_stage1_weights_at_step_0(stages):
    root, res = stages
    for name in ("stage2", "stage2_ema"):
        r = res[name]
        assert r["step"] == 0 and r["ok"], name
        assert r["names_covered"] and r["all_equal"], name  # 8x8 -> 16x16 latents: same weights
        assert r["ema_equal"], name  # EMA starts from the stored EMA
    assert all(math.isfinite(x) for x in res["stage2"]["losses"])
    recs = [json.loads(x) for x in (root / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]  # stage 2 counts from 0, then resumes at 2
    assert recs[0]["train/lr"] == 0.0  # a fresh warm-up schedule (optim.warmup_steps=2)


def test_resubmitted_stage_resumes_its_own_checkpoint(stages):
    _, res = stages
    assert res["resubmit_step"] == 2
    assert len(res["resubmit_losses"]) == 1


def test_non_strict_reports_missing_and_unexpected_keys(stages):
    _, res = stages
    rep = res["lenient"]
    # adaLN-Zero's per-block linears are not in an adaLN-single model, and vice versa.
    assert "decoder.layers.adaln.linear.weight" in rep["unexpected"]
    assert "t_block.1.weight" in rep["missing"]
    assert rep["loaded"] and not rep["mismatched"]
    assert "decoder.layers.adaln.linear.weight" in res["single_strict"]


def test_strict_shape_mismatch_names_the_key(stages):
    _, res = stages
    msg = res["narrow_strict"]
    assert msg is not None and "shape mismatch" in msg and "y_embedder" in msg
    assert "checkpoint.init_strict=false" in msg and msg.startswith("checkpoint.init_from=")
    rep = res["narrow_lenient"]
    assert [k for k, *_ in rep["mismatched"]] and all(
        "y_embedder" in k for k, *_ in rep["mismatched"]
    )


def test_init_from_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint.init_from=''"):
        CheckpointConfig(init_from="")
    with pytest.raises(ValueError, match=r"checkpoint.init_from=.*either checkpoint.load"):
        CheckpointConfig(init_from=str(tmp_path), load=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# init_from a Hugging Face (diffusers) export, a .pth training container, a .safetensors file
# ---------------------------------------------------------------------------------------------
MICRO = ModelConfig(name="Lumos-Micro/2", latent_size=8, cond_channels=32)  # make_job's model


def _random_hf_model(seed: int):
    """``LumosTransformer2DModel`` of MICRO (the HF export class) with every weight random."""
    import torch

    from lumos_mcore.hf import LumosTransformer2DModel
    from lumos_mcore.models.dit.hf_adapter import hf_config_from_model_config

    model = LumosTransformer2DModel(**hf_config_from_model_config(MICRO))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _full(chunks, tensors_of) -> dict:
    """This rank's shards (``tensors_of(i, core)``: local name -> tensor) with their TP dims,
    for ``state_dict.assemble`` in the test process."""
    from lumos_mcore.models.dit.state_dict import local_shards
    from lumos_mcore.training.setup import unwrap

    out = {}
    for i, chunk in enumerate(chunks):
        core = unwrap(chunk)
        out.update(local_shards(core, tensors_of(i, core)))
    return out


def _load(cfg, parallel, path, *, seed, **kwargs):
    """A fresh model (and EMA) at ``parallel``, loaded from ``path``: (weights, EMA, report)."""
    from lumos_mcore.parallel.state import initialize_parallel
    from lumos_mcore.training.checkpoint import Checkpointer
    from lumos_mcore.training.ema import EMA
    from lumos_mcore.training.setup import build_model

    initialize_parallel(parallel, num_attention_heads=cfg.num_heads_, num_layers=cfg.depth_)
    chunks, _ = build_model(cfg, parallel, seed=seed, wrap_ddp=False)
    ema = EMA(chunks, decay=0.99)
    state, report = Checkpointer("unused").load_weights(path, chunks, None, ema, **kwargs)
    weights = _full(chunks, lambda i, core: dict(core.named_parameters()))
    shadows = _full(chunks, lambda i, core: ema.shadow[i])
    return {"step": state["step"], "weights": weights, "ema": shadows, "report": report}


def _error(fn, *args, **kwargs) -> str | None:
    try:
        fn(*args, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _converted_one_rank(rank: int, world: int, paths: dict, jobs: dict) -> dict:
    """Every source kind into a fresh one-process model; fit reports and errors; the trainer."""
    from lumos_mcore.config.parallel import ParallelConfig
    from lumos_mcore.training.loop import Trainer
    from lumos_mcore.training.setup import unwrap

    one = ParallelConfig()
    out = {
        "hf": _load(MICRO, one, paths["hf"], seed=11),
        "pth": _load(MICRO, one, paths["pth"], seed=12),
        "pth_ema": _load(MICRO, one, paths["pth"], seed=13, from_ema=True),
        "plain_pth": _load(MICRO, one, paths["plain_pth"], seed=14),
        "safetensors": _load(MICRO, one, paths["safetensors"], seed=15),
    }
    narrow = dataclasses.replace(MICRO, cond_channels=16)
    single = dataclasses.replace(MICRO, adaln_type="single")
    out["narrow_lenient"] = _load(narrow, one, paths["hf"], seed=16, strict=False)["report"]
    out["single_lenient"] = _load(single, one, paths["pth"], seed=17, strict=False)["report"]
    out["narrow_strict"] = _error(_load, narrow, one, paths["hf"], seed=18)
    out["hf_ema"] = _error(_load, MICRO, one, paths["hf"], seed=19, from_ema=True)
    out["plain_pth_ema"] = _error(_load, MICRO, one, paths["plain_pth"], seed=19, from_ema=True)
    for name in ("missing", "empty_dir", "odd_file"):
        out[name] = _error(_load, MICRO, one, paths[name], seed=19)

    t = Trainer(jobs["from_hf"])  # through the config and the training loop
    params = {n: p.detach().clone() for n, p in unwrap(t.chunks[0]).named_parameters()}
    out["trainer"] = {"step": t.step, "ok": t.init_report.ok, "params": params}
    out["trainer_losses"] = t.run().losses
    out["trainer_missing"] = _error(Trainer, jobs["missing"])
    out["trainer_odd"] = _error(Trainer, jobs["odd_file"])
    return out


def _converted_two_ranks(rank: int, world: int, paths: dict, pixart_cfg) -> dict:
    from lumos_mcore.config.parallel import ParallelConfig

    tp2 = ParallelConfig(tp=2)
    return {
        "tp2_hf": _load(MICRO, tp2, paths["hf"], seed=21),
        "tp2_pth": _load(MICRO, tp2, paths["pth"], seed=22),
        "pp2_safetensors": _load(MICRO, ParallelConfig(pp=2), paths["safetensors"], seed=23),
        "tp2_pixart": _load(pixart_cfg, tp2, paths["pixart"], seed=24),
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random model in the released layout saved as a .pth training container (training
    weights + EMA), exported to an HF folder by the project's converter, and as a plain .pth
    and a .safetensors file; loaded at one rank, TP=2 and PP=2."""
    import torch
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import save_file

    from lumos_mcore.convert import convert_checkpoint, open_source
    from lumos_mcore.models.dit.hf_adapter import hf_to_mcore
    from tests.convert.test_pixart_pth import PIXART, _randomise

    root = tmp_path_factory.mktemp("init_from_converted")
    raw, ema = _random_hf_model(seed=1), _random_hf_model(seed=2)
    raw_sd = {k: v.clone() for k, v in raw.state_dict().items()}
    ema_sd = {k: v.clone() for k, v in ema.state_dict().items()}
    assert "pos_embed" not in raw_sd  # a non-persistent buffer: not a weight
    pth = root / "stage1.pth"
    torch.save(
        {
            "state_dict": {f"module.{k}": v for k, v in raw_sd.items()},
            "ema": {**ema_sd, "pos_embed": ema.pos_embed.clone()},
            "step": 1000,
        },
        pth,
    )
    torch.save(raw_sd, root / "plain.pth")
    save_file({**raw_sd, "pos_embed": raw.pos_embed.clone().contiguous()}, root / "w.safetensors")
    hf = convert_checkpoint(
        pth, "lumos-pth", root / "hf", "hf", num_heads=MICRO.num_heads_, max_shard_size="20KB"
    )
    assert (hf / "config.json").is_file() and len(list(hf.glob("*.safetensors"))) > 1
    # A diffusers PixArt folder (adaLN-single, every weight random) and its megatron weights.
    pixart = PixArtTransformer2DModel(**PIXART)
    _randomise(pixart, seed=3)
    pixart.save_pretrained(root / "pixart")
    px = open_source(root / "pixart", "pixart-diffusers")
    pixart_raw = hf_to_mcore(dict(px.tensors()), px.model_config)
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a checkpoint\n")
    paths = {
        "hf": str(hf),
        "pth": str(pth),
        "plain_pth": str(root / "plain.pth"),
        "safetensors": str(root / "w.safetensors"),
        "pixart": str(root / "pixart"),
        "missing": str(root / "no_such_stage"),
        "empty_dir": str(root / "empty"),
        "odd_file": str(root / "notes.txt"),
    }
    data = make_data(root / "data", latent_size=8)
    jobs = {
        name: make_job(data, root / f"run_{name}", steps=2, checkpoint=_init(paths[key]))
        for name, key in (("from_hf", "hf"), ("missing", "missing"), ("odd_file", "odd_file"))
    }
    (one,) = run_distributed(_converted_one_rank, 1, paths, jobs, timeout=300)
    two = run_distributed(_converted_two_ranks, 2, paths, px.model_config, timeout=300)
    return {
        "paths": paths,
        "raw": hf_to_mcore(raw_sd, MICRO),  # the source weights in megatron names
        "ema": hf_to_mcore(ema_sd, MICRO),
        "raw_hf": raw_sd,
        "pixart": pixart_raw,
        "one": one,
        "two": two,
    }


def _assert_equal(got: dict, want: dict, what: str) -> None:
    import torch

    assert set(got) == set(want), what
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32, (what, name)
        assert torch.equal(got[name], tensor), (what, name)


def _assembled(*rank_results: dict, key: str, part: str) -> dict:
    from lumos_mcore.models.dit.state_dict import assemble

    return assemble([r[key][part] for r in rank_results])


@pytest.mark.parametrize("source", ["hf", "pth", "plain_pth", "safetensors"])
def test_init_from_converted_source_one_rank(converted, source):
    res = converted["one"][source]
    assert res["step"] == 0 and res["report"].ok, res["report"].describe()
    assert res["report"].loaded == sorted(converted["raw"])
    weights = _assembled(converted["one"], key=source, part="weights")
    _assert_equal(weights, converted["raw"], source)  # the .pth's training weights
    # The EMA restarts from the loaded weights, except that a .pth training container's
    # stored EMA seeds it (as a megatron checkpoint's does).
    want_ema = converted["ema"] if source == "pth" else converted["raw"]
    _assert_equal(_assembled(converted["one"], key=source, part="ema"), want_ema, source)


def test_init_from_pth_ema_weights(converted):
    res = converted["one"]["pth_ema"]
    assert res["step"] == 0 and res["report"].ok
    _assert_equal(_assembled(converted["one"], key="pth_ema", part="weights"), converted["ema"], "")
    _assert_equal(_assembled(converted["one"], key="pth_ema", part="ema"), converted["ema"], "")


def test_init_from_hf_weights_round_trip_to_the_source_names(converted):
    """Independent of the megatron names: the loaded model converted back equals the source
    state dict tensor for tensor (fused QKV / KV rows included)."""
    from lumos_mcore.models.dit.hf_adapter import mcore_to_hf

    weights = _assembled(converted["one"], key="hf", part="weights")
    _assert_equal(mcore_to_hf(weights, MICRO), converted["raw_hf"], "hf round trip")


@pytest.mark.parametrize("source", ["tp2_hf", "tp2_pth", "pp2_safetensors"])
def test_init_from_converted_source_two_ranks(converted, source):
    ranks = converted["two"]
    for r in ranks:
        assert r[source]["step"] == 0 and r[source]["report"].ok, r[source]["report"].describe()
        assert r[source]["report"].loaded == sorted(converted["raw"])  # all ranks: whole model
    qkv, fc1 = (
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.1.mlp.linear_fc1.weight",
    )
    if source.startswith("tp2"):  # each rank holds its heads' rows of the fused QKV
        for tp_rank, r in enumerate(ranks):
            tensor, dim, rank_of, _ = r[source]["weights"][qkv]
            assert (dim, rank_of) == (0, tp_rank)
            assert 2 * tensor.shape[0] == converted["raw"][qkv].shape[0]
    else:  # each stage holds its own layer
        assert fc1 not in ranks[0][source]["weights"] and fc1 in ranks[1][source]["weights"]
    _assert_equal(_assembled(*ranks, key=source, part="weights"), converted["raw"], source)
    want_ema = converted["ema"] if source == "tp2_pth" else converted["raw"]
    _assert_equal(_assembled(*ranks, key=source, part="ema"), want_ema, source)


def test_init_from_pixart_diffusers_folder_tp2(converted):
    ranks = converted["two"]
    for r in ranks:
        assert r["tp2_pixart"]["report"].ok, r["tp2_pixart"]["report"].describe()
    assert "t_block.1.weight" in converted["pixart"]  # adaLN-single
    want = converted["pixart"]
    _assert_equal(_assembled(*ranks, key="tp2_pixart", part="weights"), want, "pixart")
    _assert_equal(_assembled(*ranks, key="tp2_pixart", part="ema"), want, "pixart")


def test_init_from_converted_fit_reports(converted):
    one = converted["one"]
    rep = one["narrow_lenient"]  # cond_channels 16 vs the source's 32
    assert [k for k, *_ in rep.mismatched] == [
        "y_embedder.y_embedding",
        "y_embedder.y_proj.fc1.weight",
    ]
    assert rep.mismatched[1][1:] == ((32, 32), (32, 16))
    assert not rep.missing and not rep.unexpected and rep.loaded
    msg = one["narrow_strict"]
    assert msg.startswith("ValueError: HF folder") and "shape mismatch" in msg
    assert "y_embedder.y_embedding" in msg and "checkpoint.init_strict=false" in msg
    rep = one["single_lenient"]  # adaLN-single model from an adaLN-Zero .pth
    assert "t_block.1.weight" in rep.missing
    assert "decoder.layers.0.adaln.scale_shift_table" in rep.missing
    assert "decoder.layers.1.adaln.linear.weight" in rep.unexpected
    assert not rep.mismatched and "final_layer.linear.weight" in rep.loaded


def test_init_from_converted_errors(converted):
    one = converted["one"]
    assert "holds one set of weights" in one["hf_ema"]
    assert "drop checkpoint.init_from_ema" in one["hf_ema"]
    assert "holds no EMA weights" in one["plain_pth_ema"]
    assert "drop checkpoint.init_from_ema" in one["plain_pth_ema"]
    assert one["missing"].startswith("FileNotFoundError:") and "does not exist" in one["missing"]
    assert "not a recognised checkpoint folder" in one["empty_dir"]
    assert "diffusers model folder" in one["empty_dir"]
    assert "cannot tell the kind of a .txt file" in one["odd_file"]


def test_trainer_init_from_hf_folder(converted):
    one = converted["one"]
    assert one["trainer"]["step"] == 0 and one["trainer"]["ok"]
    _assert_equal(one["trainer"]["params"], converted["raw"], "trainer")
    assert all(math.isfinite(x) for x in one["trainer_losses"]) and len(one["trainer_losses"]) == 2
    p = converted["paths"]
    assert one["trainer_missing"] == (
        f"FileNotFoundError: checkpoint.init_from={p['missing']}: {p['missing']}: does not exist"
    )
    assert one["trainer_odd"].startswith(f"ValueError: checkpoint.init_from={p['odd_file']}: ")

"""Launchers: tools/launch.py output, and the sbatch / torchrun scripts run against fake
``srun`` / ``scontrol`` / ``torchrun`` executables (SLURM is absent here).

The fakes record their arguments; the torchrun command lines are parsed with torchrun's own
argument parser and the trainer's, so a flag torchrun or ``lumos_mcore.train`` does not accept
fails the test. The requeue logic is driven by the checkpoint step the fake run leaves behind.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from lumos_mcore.config.job import JobConfig
from lumos_mcore.config.loader import load_config
from lumos_mcore.data.synthetic import write_synthetic_feature_shards
from lumos_mcore.train import parse_args as train_parse_args

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import launch  # noqa: E402

RECIPE = "examples/recipes/lumos_i2i_xl2_256.yaml"
TEMPLATE = ROOT / "examples" / "launch" / "slurm_multinode.sbatch"
SINGLE = ROOT / "examples" / "launch" / "torchrun_single_node.sh"

FAKE_SRUN = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG/srun"
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i "$@" || exit $?
done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-node-01\\ngpu-node-02\\n'; exit 0; fi
echo "$*" >> "$FAKE_LOG/scontrol"
"""
FAKE_TORCHRUN = """#!{python}
import json, os, re, sys
from pathlib import Path
status = open("/proc/self/status").read()
ignored = int(re.search(r"SigIgn:\\s+([0-9a-f]+)", status).group(1), 16)
keys = ("CUDA_DEVICE_MAX_CONNECTIONS", "PET_SIGNALS_TO_HANDLE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
        "OMP_NUM_THREADS")
rec = {{"argv": sys.argv[1:], "node": os.environ.get("SLURM_NODEID", "0"),
        "env": {{k: os.environ.get(k) for k in keys}}, "usr1_ignored": bool(ignored >> 9 & 1)}}
log = Path(os.environ["FAKE_LOG"])
with open(log / "torchrun.jsonl", "a") as f:
    f.write(json.dumps(rec) + "\\n")
print("fake torchrun on node", rec["node"])
step = os.environ.get("FAKE_STEP")
if step and rec["node"] == "0":
    ckpt = Path(os.environ["FAKE_CKPT"])
    (ckpt / f"iter_{{int(step):07d}}").mkdir(parents=True, exist_ok=True)
    (ckpt / "latest").write_text(f"iter_{{int(step):07d}}\\n")
sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("launch") / "data"
    write_synthetic_feature_shards(
        out, num_samples=4, latent_size=8, cond_tokens=1, cond_dim=16, samples_per_shard=4
    )
    return str(out)


@pytest.fixture
def fakes(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (
        ("srun", FAKE_SRUN),
        ("scontrol", FAKE_SCONTROL),
        ("torchrun", FAKE_TORCHRUN.format(python=sys.executable)),
    ):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "log").mkdir()
    return tmp_path


def _env(fakes: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{fakes / 'bin'}:{Path(sys.executable).parent}:{env['PATH']}",
        PYTHON=sys.executable,
        TORCHRUN=str(fakes / "bin" / "torchrun"),
        FAKE_LOG=str(fakes / "log"),
        SLURM_JOB_ID="4242",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="gpu-node-[01-02]",
        SLURM_GPUS_PER_NODE="h100:4",
    )
    for key in ("SLURM_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        env.pop(key, None)  # as in a fresh batch job
    env.update(extra)
    return env


def _torchrun_calls(fakes: Path) -> list[dict]:
    path = fakes / "log" / "torchrun.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _check_train_command(script_args: list[str], data_dir: str, out_dir: str) -> JobConfig:
    """The arguments after ``-m lumos_mcore.train`` parse and load the intended job."""
    args = train_parse_args(script_args)
    assert args.config == RECIPE
    job = load_config(JobConfig, ROOT / args.config, args.overrides)
    assert job.data.path == data_dir and job.train.output_dir == out_dir
    return job


def test_dry_run_prints_a_valid_script(data_dir, tmp_path, capsys):
    out_dir = str(tmp_path / "run")
    rc = launch.main(
        ["--recipe", RECIPE, "--nodes", "8", "--partition", "h100", "--time", "12:00:00",
         "--sbatch-arg=--constraint=nvlink", "--dry-run", f"data.path={data_dir}",
         f"train.output_dir={out_dir}"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    summary = text.splitlines()[0]
    assert "64 ranks = tp1 x pp1 x cp1 x dp64" in summary and "4 micro-batches x 64" in summary
    script = text[text.index("#!/bin/bash") :]
    (tmp_path / "s.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "s.sbatch")], check=True)
    header = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, flags=re.M))
    assert header["nodes"] == "8" and header["gpus-per-node"] == "8"
    assert header["ntasks-per-node"] == "1" and header["partition"] == "h100"
    assert header["time"] == "12:00:00" and header["constraint"] == "nvlink"
    assert header["signal"] == "USR1@120" and "requeue" in header
    assert header["output"] == f"{out_dir}/slurm/%x-%j.out"
    baked = next(line for line in script.splitlines() if line.startswith("set -- "))
    assert shlex.split(baked)[2:] == [
        RECIPE,
        f"data.path={data_dir}",
        f"train.output_dir={out_dir}",
    ]
    # The per-node torchrun command parses with torchrun's parser and the trainer's.
    line = next(ln for ln in text.splitlines() if ln.startswith("# per-node command: "))
    cmd = shlex.split(line.removeprefix("# per-node command: "))
    assert cmd[0] == "torchrun"
    targs = get_args_parser().parse_args(cmd[1:])
    assert (targs.nnodes, targs.nproc_per_node, targs.rdzv_backend) == ("8", "8", "c10d")
    assert targs.module and targs.training_script == "lumos_mcore.train"
    _check_train_command(targs.training_script_args, data_dir, out_dir)


def test_layout_that_does_not_fit_is_refused(data_dir, capsys):
    with pytest.raises(SystemExit) as exc:  # 16384 samples over 3 x 8 = 24 ranks of 64
        launch.main(["--recipe", RECIPE, "--nodes", "3", "--dry-run", f"data.path={data_dir}"])
    assert exc.value.code == 2
    assert "train.global_batch_size=16384" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # tp must divide the 16 heads
        launch.main(
            [
                "--recipe",
                RECIPE,
                "--nodes",
                "1",
                "--dry-run",
                f"data.path={data_dir}",
                "parallel.tp=3",
            ]
        )
    assert "parallel.tp=3" in capsys.readouterr().err


def test_resolve_prints_the_run_folders(data_dir, capsys):
    assert launch.main(["resolve", RECIPE, f"data.path={data_dir}", "train.steps=77"]) == 0
    values = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert values == {
        "OUTPUT_DIR": "runs/lumos_i2i_xl2_256",
        "CKPT_DIR": "runs/lumos_i2i_xl2_256/checkpoints",
        "TRAIN_STEPS": "77",
    }


@pytest.mark.parametrize(
    ("case", "step", "requeued", "ok"),
    [
        ("progress", "500", True, True),
        ("finished", "1000", False, True),
        ("stalled", "", False, False),
    ],
)
def test_sbatch_under_fake_slurm(case, step, requeued, ok, data_dir, fakes):
    out_dir = str(fakes / "run")
    overrides = [f"data.path={data_dir}", f"train.output_dir={out_dir}", "train.steps=1000"]
    if case == "stalled":  # the template itself, recipe and overrides as sbatch arguments
        cmd = ["bash", str(TEMPLATE), RECIPE, *overrides]
    else:  # a script written by the launcher
        script = fakes / "job.sbatch"
        argv = ["--recipe", RECIPE, "--nodes", "2", "--gpus-per-node", "4", "-o", str(script)]
        assert launch.main(argv + overrides) == 0
        cmd = ["bash", str(script)]
    env = _env(fakes, FAKE_STEP=step, FAKE_CKPT=f"{out_dir}/checkpoints", LUMOS_ROOT=str(ROOT))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert (res.returncode == 0) == ok, res.stdout + res.stderr
    scontrol = fakes / "log" / "scontrol"
    assert (scontrol.exists() and "requeue 4242" in scontrol.read_text()) == requeued
    assert "--kill-on-bad-exit=1" in (fakes / "log" / "srun").read_text()
    calls = _torchrun_calls(fakes)
    assert sorted(c["node"] for c in calls) == ["0", "1"]  # one torchrun per node
    for call in calls:
        assert call["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
        assert "SIGUSR1" in call["env"]["PET_SIGNALS_TO_HANDLE"].split(",")
        assert call["usr1_ignored"]  # an old torchrun survives SLURM's SIGUSR1
        targs = get_args_parser().parse_args(call["argv"])
        assert (targs.nnodes, targs.nproc_per_node) == ("2", "4")
        assert targs.rdzv_endpoint == f"gpu-node-01:{29500 + 4242 % 1000}"
        assert (targs.rdzv_backend, targs.rdzv_id, targs.max_restarts) == ("c10d", "4242", 0)
        assert targs.log_dir == f"{out_dir}/logs/torchrun_4242_0"
        assert targs.module and targs.training_script == "lumos_mcore.train"
        _check_train_command(targs.training_script_args, data_dir, out_dir)
    if case == "stalled":
        assert "not requeueing" in res.stderr


def test_single_node_script_under_fake_torchrun(data_dir, fakes):
    out_dir = str(fakes / "run")
    env = _env(fakes, NPROC_PER_NODE="2")
    res = subprocess.run(
        ["bash", str(SINGLE), RECIPE, f"data.path={data_dir}", f"train.output_dir={out_dir}"],
        env=env,
        capture_output=True,
        text=True,
        cwd=fakes,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (call,) = _torchrun_calls(fakes)
    targs = get_args_parser().parse_args(call["argv"])
    assert (targs.nnodes, targs.nproc_per_node, targs.standalone) == ("1", "2", True)
    assert targs.module and targs.training_script == "lumos_mcore.train"
    _check_train_command(targs.training_script_args, data_dir, out_dir)
    logs = list((Path(out_dir) / "logs").glob("torchrun_*.log"))
    assert len(logs) == 1 and "fake torchrun on node 0" in logs[0].read_text()

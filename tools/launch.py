"""Write, print or submit the SLURM batch script for a recipe on N nodes.

    python tools/launch.py --recipe examples/recipes/lumos_i2i_xl2_256.yaml --nodes 8 \
        --partition gpu --time 12:00:00 [--dry-run | --submit] [key=value ...]

The recipe plus overrides is loaded and validated first, including the parallel layout against
the world size (nodes x GPUs per node) and the batch split, so a bad combination fails here
instead of after hours in the queue. The script is ``examples/launch/slurm_multinode.sbatch``
with its ``#SBATCH`` header filled in and the recipe + overrides baked in (so a requeued job
runs the same command). Without ``--dry-run`` it is written to
``<train.output_dir>/slurm/<job-name>.sbatch`` (``-o`` to choose); ``--submit`` also runs
``sbatch`` on it; ``--dry-run`` prints it with the per-node torchrun command and writes nothing.
Jobs run from the repository root, so relative paths in the recipe are relative to it.

    python tools/launch.py resolve RECIPE.yaml [key=value ...]

prints ``OUTPUT_DIR``, ``CKPT_DIR`` and ``TRAIN_STEPS`` as shell assignments (the batch and
single-node scripts ``eval`` them to find the checkpoint folder and to decide on requeueing).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "launch" / "slurm_multinode.sbatch"
ARGS_MARKER = "#@LAUNCH_ARGS@"

try:
    from lumos_mcore.config.job import JobConfig
    from lumos_mcore.config.loader import load_config
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))
    from lumos_mcore.config.job import JobConfig
    from lumos_mcore.config.loader import load_config


@dataclass(frozen=True)
class LaunchPlan:
    """What one submission will run."""

    recipe: str
    overrides: tuple[str, ...]
    nodes: int
    gpus_per_node: int
    job_name: str
    output_dir: str
    checkpoint_dir: str
    train_steps: int
    summary: str  # layout / batch split, e.g. "tp2 x pp1 x cp1 x dp32, 4 micro-batches"

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def load_job(recipe: str, overrides: list[str]) -> JobConfig:
    """The job config of ``recipe`` + ``overrides`` (validated like ``lumos_mcore.train``)."""
    return load_config(JobConfig, recipe, overrides)


def check_layout(job: JobConfig, world_size: int) -> str:
    """Validate parallel sizes and batch split for ``world_size`` ranks; return a summary."""
    m, p = job.model, job.parallel
    dp = p.validate(
        world_size,
        num_attention_heads=m.num_heads_,
        num_layers=m.depth_,
        seq_len=m.num_tokens,
    )
    source = job.data if job.data is not None else job.media
    nmb = job.train.num_microbatches(dp, pp=p.pp, vpp=None if source.pack else p.vpp)
    sp = "+sp" if p.sequence_parallel else ""
    return (
        f"{world_size} ranks = tp{p.tp}{sp} x pp{p.pp} x cp{p.cp} x dp{dp}; global batch "
        f"{job.train.global_batch_size} = {nmb} micro-batches x {job.train.micro_batch_size} "
        f"x dp{dp}; {m.num_tokens} tokens per sample"
    )


def make_plan(args: argparse.Namespace) -> LaunchPlan:
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    world = args.nodes * args.gpus_per_node
    if args.no_validate:
        job = None
        summary = f"{world} ranks (layout not validated: --no-validate)"
    else:
        job = load_job(args.recipe, overrides)
        summary = check_layout(job, world)
    out = job.train.output_dir if job else (args.output_dir or "runs")
    ckpt = job.checkpoint_dir if job else f"{out}/checkpoints"
    stem = Path(args.recipe).stem.replace("_", "-")
    name = args.job_name or (stem if stem.startswith("lumos") else f"lumos-{stem}")
    if any(c.isspace() for c in out + name):
        raise ValueError(
            f"train.output_dir={out!r} / job name {name!r}: #SBATCH lines cannot hold "
            "whitespace; choose a path and name without spaces"
        )
    return LaunchPlan(
        recipe=args.recipe,
        overrides=tuple(overrides),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        job_name=name,
        output_dir=out,
        checkpoint_dir=ckpt,
        train_steps=job.train.steps if job else 0,
        summary=summary,
    )


def render_sbatch(plan: LaunchPlan, args: argparse.Namespace, template: str | None = None) -> str:
    """The batch script: template header replaced, recipe + overrides baked in."""
    text = template if template is not None else TEMPLATE.read_text()
    directives = {
        "job-name": plan.job_name,
        "nodes": str(plan.nodes),
        "ntasks-per-node": "1",
        "gpus-per-node": str(plan.gpus_per_node),
        "time": args.time,
        "output": f"{_under_root(plan.output_dir)}/slurm/%x-%j.out",
    }
    optional = {
        "partition": args.partition,
        "account": args.account,
        "qos": args.qos,
        "cpus-per-task": str(args.cpus_per_task) if args.cpus_per_task else None,
        "mem": args.mem,
    }
    out: list[str] = []
    seen: set[str] = set()
    last_directive = -1
    for line in text.splitlines():
        m = re.match(r"#SBATCH --([\w-]+)", line)
        if m:
            key = m.group(1)
            if key in directives:
                line = f"#SBATCH --{key}={directives[key]}"
                seen.add(key)
            out.append(line)
            last_directive = len(out) - 1
        elif line.startswith(ARGS_MARKER):
            words = [plan.recipe, *plan.overrides]
            out.append("set -- " + " ".join(shlex.quote(w) for w in words))
        else:
            out.append(line)
    if last_directive < 0 or not any(line.startswith("set -- ") for line in out):
        raise ValueError(f"{TEMPLATE}: no #SBATCH header or no {ARGS_MARKER} line to fill in")
    extra = [f"#SBATCH --{k}={v}" for k, v in directives.items() if k not in seen]
    extra += [f"#SBATCH --{k}={v}" for k, v in optional.items() if v]
    extra += [f"#SBATCH {d}" for d in args.sbatch_arg]
    out[last_directive + 1 : last_directive + 1] = extra
    env = [f"export LUMOS_ROOT=${{LUMOS_ROOT:-{shlex.quote(str(ROOT))}}}"]
    if args.env_setup:
        env.append(f"export LUMOS_ENV_SETUP={shlex.quote(args.env_setup)}")
    marker = next(i for i, line in enumerate(out) if line.startswith("set -- "))
    out[marker + 1 : marker + 1] = env
    return "\n".join(out) + "\n"


def _under_root(path: str) -> Path:
    """Relative run paths are relative to the repository root (where the job runs)."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def node_command(plan: LaunchPlan) -> list[str]:
    """The torchrun command each node runs (rendezvous host left symbolic)."""
    return [
        "torchrun",
        "--nnodes",
        str(plan.nodes),
        "--nproc-per-node",
        str(plan.gpus_per_node),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "$MASTER_ADDR:$MASTER_PORT",
        "--rdzv-id",
        "$SLURM_JOB_ID",
        "--max-restarts",
        "0",
        "-m",
        "lumos_mcore.train",
        "--config",
        plan.recipe,
        *plan.overrides,
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipe", required=True, help="YAML recipe (examples/recipes/)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--job-name", default=None, help="default: lumos-<recipe name>")
    p.add_argument("--time", default="04:00:00", help="wall-clock limit per allocation")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem", default=None, help="e.g. 0 for all node memory")
    p.add_argument(
        "--sbatch-arg", action="append", default=[], help="extra directive, e.g. --constraint=h100"
    )
    p.add_argument("--env-setup", default=None, help="file each job sources first (venv, modules)")
    p.add_argument("--output-dir", default=None, help="override train.output_dir")
    p.add_argument("-o", "--out", default=None, help="where to write the script")
    p.add_argument("--no-validate", action="store_true", help="skip loading the recipe here")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print, write nothing")
    mode.add_argument("--submit", action="store_true", help="write and run sbatch")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def resolve(argv: list[str]) -> str:
    """Shell assignments of the run's output folder, checkpoint folder and length."""
    if not argv:
        raise SystemExit("usage: launch.py resolve RECIPE.yaml [key=value ...]")
    job = load_job(argv[0], argv[1:])
    return (
        f"OUTPUT_DIR={shlex.quote(job.train.output_dir)}\n"
        f"CKPT_DIR={shlex.quote(job.checkpoint_dir)}\n"
        f"TRAIN_STEPS={int(job.train.steps)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["resolve"]:
        try:
            print(resolve(argv[1:]), end="")
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus-per-node must be >= 1")
    try:
        plan = make_plan(args)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    script = render_sbatch(plan, args)
    print(f"# {plan.job_name}: {plan.nodes} nodes x {plan.gpus_per_node} GPUs; {plan.summary}")
    print(
        f"# checkpoints: {plan.checkpoint_dir} | SLURM log: {plan.output_dir}/slurm/ | "
        f"rank logs: {plan.output_dir}/logs/"
    )
    if args.dry_run:
        print("# per-node command: " + " ".join(shlex.quote(w) for w in node_command(plan)))
        print(script, end="")
        return 0
    slurm_dir = _under_root(plan.output_dir) / "slurm"
    path = Path(args.out) if args.out else slurm_dir / f"{plan.job_name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    slurm_dir.mkdir(parents=True, exist_ok=True)  # must exist before SLURM opens --output
    path.write_text(script)
    path.chmod(0o755)
    print(f"# wrote {path}")
    if args.submit:
        return subprocess.run(["sbatch", str(path)], check=False).returncode
    print(f"sbatch {shlex.quote(str(path))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Entry point: ``torchrun --nproc-per-node N -m lumos_mcore.train --config job.yaml [k=v ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lumos_mcore.config.job import JobConfig
from lumos_mcore.config.loader import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lumos-train",
        description="Train a Lumos diffusion transformer on megatron-core.",
        epilog="Overrides use dotted keys, e.g. parallel.tp=2 train.steps=100 model.name=Lumos-B/2",
    )
    parser.add_argument("--config", help="YAML job config (see examples/recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied after the YAML")
    return parser.parse_args(argv)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    job = load_config(JobConfig, args.config, args.overrides)
    from lumos_mcore.training.loop import Trainer  # heavy imports after argument errors

    result = Trainer(job).run()
    logging.getLogger("lumos_mcore.train").info(
        "finished at step %d; checkpoint: %s", result.final_step, result.checkpoint
    )
    from lumos_mcore.parallel.state import destroy_parallel

    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Parallel layout of a run: tensor / pipeline / context / data parallel sizes and options.

``__post_init__`` checks what is wrong on its own; ``validate`` checks the layout against the
world size and the model, so that a bad combination fails before any process group exists,
with a message naming the ``parallel.*`` flag to change.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CP_COMM_TYPES", "ParallelConfig", "check_te_packed_cp", "interleaved_fits"]

CP_COMM_TYPES: tuple[str, ...] = ("p2p", "all_gather", "a2a")


def check_te_packed_cp(cp_comm_type: str, cp_layout: str) -> None:
    """Refuse what TransformerEngine's context parallelism cannot do with packs (THD).

    Only TE's ``p2p`` ring takes THD: its all-gather path asserts ``qkv_format != 'thd'`` and its
    a2a path refuses the padding mask megatron sets for THD. The ring also expects every sequence
    split zig-zag (chunks ``r`` and ``2cp-1-r``): a contiguous split gives wrong attention with
    no error. ``cp_layout='auto'`` is zig-zag on the TE spec.
    """
    if cp_comm_type != "p2p":
        raise ValueError(
            f"parallel.cp_comm_type={cp_comm_type!r}: packed sequences under TransformerEngine "
            "context parallelism need parallel.cp_comm_type=p2p"
        )
    if cp_layout not in ("auto", "zigzag"):
        raise ValueError(
            f"model.cp_layout={cp_layout!r}: packed sequences under TransformerEngine context "
            "parallelism need the zig-zag split; set model.cp_layout=auto or zigzag"
        )


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"parallel.{name}={value!r}: must be a positive integer")


def interleaved_fits(num_microbatches: int, pp: int, vpp: int | None) -> bool:
    """Whether megatron's schedule can run ``num_microbatches`` per step: with interleaved
    (virtual) pipeline stages it runs whole groups of ``pp`` micro-batches."""
    return vpp is None or pp == 1 or num_microbatches % pp == 0


@dataclass
class ParallelConfig:
    """Model-parallel sizes; data parallelism is whatever is left of the world size."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    cp_comm_type: str = "p2p"

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            _check_positive_int(name, getattr(self, name))
        if self.vpp is not None:
            _check_positive_int("vpp", self.vpp)
            if self.pp == 1:
                raise ValueError(
                    f"parallel.vpp={self.vpp}: virtual pipeline stages need parallel.pp > 1 "
                    "(got pp=1); unset vpp or raise pp"
                )
        for name in ("sequence_parallel", "use_distributed_optimizer", "overlap_grad_reduce"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"parallel.{name}={getattr(self, name)!r}: must be true or false")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError(
                "parallel.sequence_parallel=True: sequence parallelism splits activations over "
                "the tensor-parallel group and needs parallel.tp > 1 (got tp=1)"
            )
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ValueError(
                f"parallel.cp_comm_type={self.cp_comm_type!r}: must be one of {list(CP_COMM_TYPES)}"
            )

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one model replica: tp * pp * cp."""
        return self.tp * self.pp * self.cp

    def validate(
        self,
        world_size: int,
        *,
        num_attention_heads: int,
        num_layers: int,
        seq_len: int | None = None,
    ) -> int:
        """Check the layout against the world and the model; return the data-parallel size.

        ``seq_len`` is the token count of one (packed) sequence; when given and sequence or
        context parallelism is on, it must split evenly over ``cp * tp`` ranks.
        """
        if world_size < 1:
            raise ValueError(f"world size must be positive, got {world_size}")
        mp = self.model_parallel_size
        if world_size % mp != 0:
            # Name a size that does not divide the world, when one alone does not.
            sizes = [(f, getattr(self, f)) for f in ("tp", "pp", "cp") if getattr(self, f) > 1]
            flag = next((f for f, n in sizes if world_size % n), sizes[-1][0])
            raise ValueError(
                f"parallel.{flag}={getattr(self, flag)}: world size {world_size} is not "
                f"divisible by tp*pp*cp={mp} (tp={self.tp}, pp={self.pp}, cp={self.cp})"
            )
        if num_attention_heads % self.tp != 0:
            raise ValueError(
                f"parallel.tp={self.tp}: num_attention_heads={num_attention_heads} is not "
                "divisible by it; choose a divisor"
            )
        stages = self.pp * (self.vpp or 1)
        if num_layers % stages != 0:
            flag = "vpp" if self.vpp is not None else "pp"
            raise ValueError(
                f"parallel.{flag}={getattr(self, flag)}: num_layers={num_layers} is not divisible "
                f"by pp*vpp={stages} model chunks (pp={self.pp}, vpp={self.vpp}); each chunk "
                "needs the same number of layers"
            )
        if seq_len is not None:
            if seq_len < 1:
                raise ValueError(f"sequence length must be positive, got {seq_len}")
            split = self.cp * (self.tp if self.sequence_parallel else 1)
            if split > 1 and seq_len % split != 0:
                flag = "cp" if self.cp > 1 else "sequence_parallel"
                raise ValueError(
                    f"parallel.{flag}={getattr(self, flag)}: sequence length {seq_len} is not "
                    f"divisible by cp*tp={split} (cp={self.cp}, tp={self.tp}, "
                    f"sequence_parallel={self.sequence_parallel}); pad the sequence or change it"
                )
        return world_size // mp

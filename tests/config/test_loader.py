"""YAML + dotted-override config loader over small dataclass trees."""

from __future__ import annotations

import enum
import pathlib
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest

from lumos_mcore.config.loader import ConfigError, config_to_dict, load_config, save_config


class Precision(enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass
class Parallel:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"parallel.tp={self.tp}: must be >= 1")


@dataclass
class Train:
    steps: int = 100
    lr: float = 1.6e-4
    betas: tuple[float, float] = (0.9, 0.999)
    precision: Precision = Precision.BF16
    schedule: Literal["constant", "cosine"] = "constant"
    resume: Optional[str] = None
    milestones: list[int] = field(default_factory=list)


@dataclass
class Data:
    shards: list[str] = field(default_factory=list)
    root: pathlib.Path = pathlib.Path("/data")
    resolution: int | None = None
    weights: dict[str, float] = field(default_factory=dict)
    extra: Any = None


@dataclass
class Model:
    name: str = "Lumos-XL/2"
    hidden: int = 1152
    sizes: tuple[int, ...] = (256,)


@dataclass
class Root:
    parallel: Parallel = field(default_factory=Parallel)
    train: Train = field(default_factory=lambda: Train(steps=5))
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    seed: int = 0
    tag: str = "run"


@dataclass
class NeedsValue:
    required: int
    opt: float = 1.0


@dataclass
class HasOptionalSection:
    parallel: Optional[Parallel] = None


@dataclass
class Outer:
    inner: Root = field(default_factory=lambda: Root(train=Train(steps=7, lr=0.1)))
    weights: dict[str, float] = field(default_factory=lambda: {"a": 1.0})


def _yaml(tmp_path: pathlib.Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_without_inputs():
    cfg = load_config(Root, None, [])
    assert cfg == Root()
    # the parent's default_factory (Train(steps=5)) is the base, not Train()'s own default
    assert cfg.train.steps == 5


def test_yaml_then_overrides(tmp_path):
    path = _yaml(
        tmp_path,
        """
parallel: {tp: 4, pp: 2}
train:
  lr: 1e-4          # PyYAML reads this as a string; the float field parses it
  betas: [0.8, 0.95]
  precision: fp32
model:
  name: Lumos-B/2
""",
    )
    cfg = load_config(
        Root,
        path,
        [
            "parallel.tp=2",
            "train.steps=20",
            "model.name=Lumos-L/2",
            "data.shards=[a,b]",
            "train.milestones=[10, 20]",
            "parallel.tp=8",  # later override wins
            "data.root=/mnt/x",
            "data.weights={laion: 0.7, coyo: 0.3}",
            "seed=7",
        ],
    )
    assert cfg.parallel == Parallel(tp=8, pp=2)
    assert cfg.train.steps == 20 and cfg.train.lr == 1e-4 and cfg.train.betas == (0.8, 0.95)
    assert cfg.train.precision is Precision.FP32
    assert cfg.train.milestones == [10, 20]
    assert cfg.model.name == "Lumos-L/2" and cfg.model.hidden == 1152
    assert cfg.data.shards == ["a", "b"] and cfg.data.root == pathlib.Path("/mnt/x")
    assert cfg.data.weights == {"laion": 0.7, "coyo": 0.3}
    assert cfg.seed == 7


def test_scalar_coercions():
    cfg = load_config(
        Root,
        None,
        [
            "train.lr=3",  # int -> float
            "train.steps=1e3",  # read as str by PyYAML; integral value -> int
            "parallel.sequence_parallel=true",
            "tag=1.50",  # str field keeps the command-line text, not float 1.5
            "model.sizes=[256, 512]",
            "train.resume=null",
            "data.resolution=512",
            "data.extra={a: [1, 2]}",
            "train.schedule=cosine",
        ],
    )
    assert cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.parallel.sequence_parallel is True
    assert cfg.tag == "1.50"
    assert cfg.model.sizes == (256, 512)
    assert cfg.train.resume is None
    assert cfg.data.resolution == 512
    assert cfg.data.extra == {"a": [1, 2]}
    assert cfg.train.schedule == "cosine"
    cfg = load_config(Root, None, ["train.resume=/ckpt/iter_100", "data.resolution=", "tag="])
    assert cfg.train.resume == "/ckpt/iter_100" and cfg.data.resolution is None and cfg.tag == ""


def test_python_none_spelling_is_null_for_optional_keys_only():
    """``train.resume=None`` means no resume (not a folder called "None"); a plain str key
    keeps the text."""
    cfg = load_config(Root, None, ["train.resume=None", "data.resolution=none", "tag=None"])
    assert cfg.train.resume is None and cfg.data.resolution is None
    assert cfg.tag == "None"


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ValueError) as err:
        load_config(Root, None, ["train.stepz=3"])
    assert str(err.value) == "unknown config key 'train.stepz' (did you mean 'train.steps'?)"
    with pytest.raises(ValueError, match=r"unknown config key 'paralel' \(did you mean 'parallel'"):
        load_config(Root, _yaml(tmp_path, "paralel: {tp: 2}\n"), [])
    with pytest.raises(
        ValueError, match=r"unknown config key 'model.zzz' \(valid keys: model.name"
    ):
        load_config(Root, None, ["model.zzz=1"])


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("train.steps=abc", r"'train.steps' expects int, got str 'abc'"),
        ("train.lr=fast", r"'train.lr' expects float"),
        ("parallel.sequence_parallel=2", r"'parallel.sequence_parallel' expects bool"),
        ("train.betas=[0.9]", r"'train.betas' expects tuple\[float, float\] with 2 items"),
        ("train.milestones=[1, x]", r"'train.milestones\[1\]' expects int"),
        ("train.schedule=linear", r"'train.schedule' expects one of 'constant', 'cosine'"),
        ("train.precision=fp8", r"'train.precision' expects one of 'FP32', 'BF16'"),
        ("data.shards=a", r"'data.shards' expects list\[str\]"),
        ("model=3", r"'model' expects Model"),
        ("train.steps.x=1", r"'train.steps' expects int, got dict \{'x': 1\}"),
        ("seed", r"not of the form key=value"),
    ],
)
def test_type_errors_name_key_and_type(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(Root, None, [override])


def test_override_into_a_value_is_refused():
    with pytest.raises(ValueError, match="'train.steps' holds a value, not a section"):
        load_config(Root, None, ["train.steps=3", "train.steps.x=1"])


def test_post_init_error_propagates_unchanged():
    with pytest.raises(ValueError) as err:
        load_config(Root, None, ["parallel.tp=0"])
    assert type(err.value) is ValueError  # not wrapped into ConfigError
    assert str(err.value) == "parallel.tp=0: must be >= 1"


def test_required_and_optional_sections():
    with pytest.raises(ConfigError, match="missing required config key 'required'"):
        load_config(NeedsValue, None, ["opt=2"])
    assert load_config(NeedsValue, None, ["required=3"]) == NeedsValue(required=3)
    assert load_config(HasOptionalSection, None, []).parallel is None
    cfg = load_config(HasOptionalSection, None, ["parallel.tp=2"])
    assert cfg.parallel == Parallel(tp=2)
    with pytest.raises(ValueError, match="did you mean 'parallel.tp'"):
        load_config(HasOptionalSection, None, ["parallel.tpp=2"])


def test_partial_sections_keep_enclosing_defaults():
    cfg = load_config(Outer, None, ["inner.train.lr=0.2", "weights={b: 2.0}"])
    # the grandparent's default Train(steps=7) survives a partial override of inner.train
    assert cfg.inner.train == Train(steps=7, lr=0.2)
    # plain dict fields are replaced, not merged with their default
    assert cfg.weights == {"b": 2.0}
    assert load_config(Outer, None, []) == Outer()


def test_later_yaml_keys_win_and_sections_merge(tmp_path):
    path = _yaml(tmp_path, "train: {steps: 1}\ntrain: {lr: 0.5}\n")
    cfg = load_config(Root, path, ["train={steps: 9}"])
    # duplicate YAML keys: the last one wins (PyYAML); a mapping override merges into the section
    assert cfg.train.lr == 0.5 and cfg.train.steps == 9


def test_round_trip(tmp_path):
    cfg = load_config(
        Root,
        None,
        [
            "tag=true",  # a str that looks like a bool must survive as a str
            "model.name=null",
            "data.shards=[x, '1']",
            "train.precision=fp32",
            "train.resume=/a/b",
            "data.extra={k: [1, 2.5, null]}",
            "train.lr=1e-7",
            "data.weights={a: .inf}",
        ],
    )
    assert cfg.tag == "true" and cfg.model.name == "null"
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    again = load_config(Root, str(path), [])
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    d = config_to_dict(cfg)
    assert d["train"]["precision"] == "fp32" and d["train"]["betas"] == [0.9, 0.999]
    assert d["data"]["root"] == "/data"


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(Root, _yaml(tmp_path, "- a\n- b\n"), [])
    assert load_config(Root, _yaml(tmp_path, ""), []) == Root()

"""What an experiment is, as plain data: nested frozen dataclasses loaded from ``mdeq/configs/*.yaml``.

Why: the official code parses yacs configs into module globals, and torchdeq's ``DEQConfig.get``
lets a misspelt key fall back to its default without a word (STYLE.md 3.5). Here every key is a
dataclass field, an unknown key is an error naming the valid keys and the closest one, and
cross-field rules are checked once, in ``__post_init__``. This module imports nothing of ours.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

HEADS = ("classification", "segmentation")
INITS = ("official", "paper")
SOLVER_NAMES = ("broyden", "anderson", "fixed_point")  # the keys of mdeq.core.solvers.SOLVERS
GRAD_MODES = ("ift", "phantom", "jfb", "unrolled")
STOP_MODES = ("abs", "rel")
DATASETS = ("cifar10", "imagenet", "cityscapes")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine",)
VARIANTS = ("paper", "official", "smoke", "custom")


class ConfigError(ValueError):
    """A config key, value or combination of values that cannot be used."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{what} must be one of {list(choices)}, got {value!r}{hint}")


def _as_tuple(obj: Any, name: str) -> None:
    """Store a list-valued field as a tuple so that the frozen config stays hashable."""
    value = getattr(obj, name)
    if isinstance(value, list):
        object.__setattr__(obj, name, tuple(value))


@dataclass(frozen=True)
class ModelConfig:
    """The network: stem, f_theta (one residual block per scale + fusion) and head.

    Field names follow the paper; the official yaml name is given where it differs
    (``docs/paper_vs_released.md`` gives the released files).
    """

    head: str = "classification"  # "classification" (HRNet-style MDEQClsNet) | "segmentation" (MDEQSegNet)
    num_channels: tuple[int, ...] = (32, 64, 128, 256)  # C_i per scale, highest resolution first
    expansion: int = 5  # E: conv1 widens C -> E*C inside the residual block (EXPANSION_FACTOR)
    num_groups: int = 8  # GroupNorm groups in f; the post-fusion GN uses num_groups // 2
    downsample_times: int = 0  # stride-2 stem convs before the solver (DOWNSAMPLE_TIMES)
    injection_transform: bool = True  # 1x1 conv + BN + ReLU on the stem output ("stage0")
    dropout: float = 0.0  # variational dropout rate in every residual block
    head_channels: tuple[int, ...] = (14, 28, 56, 112)  # classification head bottleneck widths h_i
    final_channels: int = 1680  # classification head width before the linear layer (FINAL_CHANSIZE)
    in_channels: int = 3
    bn_momentum: float = 0.1  # every BatchNorm (0.1 classification, 0.01 segmentation)
    init: str = "official"  # "official": as the released code really initialises; "paper": N(0, 0.01)
    # for every conv including the weight-normalised ones (Appendix A); docs/paper_vs_released.md#initialisation

    def __post_init__(self) -> None:
        _as_tuple(self, "num_channels")
        _as_tuple(self, "head_channels")
        _check_choice(self.head, HEADS, "model.head")
        _check_choice(self.init, INITS, "model.init")
        n = len(self.num_channels)
        _check(n >= 1, "model.num_channels needs at least one scale")
        _check(all(c >= 1 for c in self.num_channels), f"model.num_channels must be positive, got {self.num_channels}")
        _check(self.expansion >= 1, f"model.expansion must be >= 1, got {self.expansion}")
        _check(self.num_groups >= 1, f"model.num_groups must be >= 1, got {self.num_groups}")
        for c in self.num_channels:
            _check(c % self.num_groups == 0 and (self.expansion * c) % self.num_groups == 0,
                   f"model.num_groups={self.num_groups} must divide every scale's channels C_i and "
                   f"expansion*C_i; got C_i={c}, expansion*C_i={self.expansion * c}")
            if n > 1:
                post = self.num_groups // 2
                _check(post >= 1 and c % post == 0,
                       f"the post-fusion GroupNorm uses num_groups // 2 = {post} groups, which must be "
                       f">= 1 and divide C_i={c} (model.num_groups={self.num_groups})")
        _check(0 <= self.downsample_times <= 2,
               f"model.downsample_times must be 0, 1 or 2 (the stem has two convs), got {self.downsample_times}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.head == "classification":
            _check(len(self.head_channels) == n,
                   f"model.head_channels needs one width per scale ({n}), got {list(self.head_channels)}")
            _check(all(h >= 1 for h in self.head_channels), "model.head_channels must be positive")
            _check(self.final_channels >= 1, "model.final_channels must be positive")
        _check(self.in_channels >= 1, f"model.in_channels must be >= 1, got {self.in_channels}")
        _check(0.0 < self.bn_momentum <= 1.0, f"model.bn_momentum must be in (0, 1], got {self.bn_momentum}")

    @property
    def num_scales(self) -> int:
        return len(self.num_channels)

    @property
    def size_divisor(self) -> int:
        """Input sides must be multiples of this: 2^(downsample_times + num_scales - 1).

        Why: the released code halves H and W per scale by integer division but downsamples with
        stride-2 convs (docs/paper_vs_released.md#data-flow-and-input-injection).
        """
        return 2 ** (self.downsample_times + self.num_scales - 1)


@dataclass(frozen=True)
class SolverConfig:
    """Forward/backward root solvers and the gradient mode of the implicit layer.

    ``max_iter`` is the paper's T_f, ``backward_max_iter`` its T_b, ``memory`` the Broyden storage m
    (Appendix Table 4); ``unroll_steps`` is NUM_LAYERS of the weight-tied warm-up
    (docs/paper_vs_released.md#unrolled-warm-up).
    """

    solver: str = "broyden"
    max_iter: int = 18
    tol: float = 1e-3
    stop_mode: str = "abs"
    memory: int = 18  # limited-memory Broyden: number of low-rank updates kept
    backward_solver: str = "broyden"
    backward_max_iter: int = 20
    # Relative per sample: the right-hand side dL/dz* scales with 1/B under a batch-mean loss, so an
    # absolute rule stops at u0 = 0 at batch 128. 1e-6 is float32 rounding: the solve runs to its cap,
    # as the released code's eps = 2e-10 sqrt(B D) makes it.
    backward_tol: float = 1e-6
    backward_stop_mode: str = "rel"
    grad: str = "ift"
    unroll_steps: int = 10
    phantom_steps: int = 5
    phantom_damping: float = 0.5
    eval_max_iter: int | None = None  # None: the training budget
    eval_tol: float | None = None
    # Fixed-point correction (Bai et al., CVPR 2022; torchdeq n_states), off at 1: supervise this many states
    # of the forward solve (spread evenly over max_iter, the last being z*), each earlier one through
    # correction_steps damped steps z <- (1 - d) z + d f(z), d = correction_damping (a phantom gradient; 1
    # step at d = 1 is the one-step gradient), its loss weighted correction_gamma^(states - 1 - k) (z*: 1).
    # docs/training_stability.md#fixed-point-correction
    correction_states: int = 1
    correction_steps: int = 1
    correction_damping: float = 1.0
    correction_gamma: float = 0.8

    def __post_init__(self) -> None:
        _check_choice(self.solver, SOLVER_NAMES, "solver.solver")
        _check_choice(self.backward_solver, SOLVER_NAMES, "solver.backward_solver")
        _check_choice(self.grad, GRAD_MODES, "solver.grad")
        _check_choice(self.stop_mode, STOP_MODES, "solver.stop_mode")
        _check_choice(self.backward_stop_mode, STOP_MODES, "solver.backward_stop_mode")
        for name in ("max_iter", "backward_max_iter", "memory", "unroll_steps", "phantom_steps"):
            _check(getattr(self, name) >= 1, f"solver.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.eval_max_iter is None or self.eval_max_iter >= 1,
               f"solver.eval_max_iter must be null or >= 1, got {self.eval_max_iter}")
        for name in ("tol", "backward_tol"):
            _check(getattr(self, name) > 0, f"solver.{name} must be > 0, got {getattr(self, name)}")
        _check(self.eval_tol is None or self.eval_tol > 0, f"solver.eval_tol must be null or > 0, got {self.eval_tol}")
        _check(0.0 < self.phantom_damping <= 1.0,
               f"solver.phantom_damping must be in (0, 1], got {self.phantom_damping}")
        for name in ("correction_states", "correction_steps"):
            _check(getattr(self, name) >= 1, f"solver.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.correction_states <= self.max_iter,
               f"solver.correction_states ({self.correction_states}) must be <= solver.max_iter ({self.max_iter}): "
               f"one state per solver step at most")
        _check(self.correction_states == 1 or self.grad != "unrolled",
               "solver.correction_states > 1 supervises states of the forward solve; with solver.grad 'unrolled' "
               "there is none")
        for name in ("correction_damping", "correction_gamma"):
            _check(0.0 < getattr(self, name) <= 1.0, f"solver.{name} must be in (0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class DataConfig:
    """Dataset, input sizes and batch sizes (global batch, summed over processes)."""

    dataset: str = "cifar10"
    augment: bool = False  # CIFAR: random crop (pad 4) + flip; ImageNet/Cityscapes: their standard training aug
    image_size: tuple[int, int] = (32, 32)  # (H, W) of a training input: the crop for Cityscapes
    eval_image_size: tuple[int, int] = (32, 32)  # (H, W) at evaluation: 224 centre crop, full 1024x2048
    num_classes: int = 10
    class_weights: tuple[float, ...] | None = None  # weighted cross-entropy (Cityscapes; HRNet-Seg's)
    batch_size: int = 128
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        for name in ("image_size", "eval_image_size", "class_weights"):
            _as_tuple(self, name)
        _check_choice(self.dataset, DATASETS, "data.dataset")
        for name in ("image_size", "eval_image_size"):
            size = getattr(self, name)
            _check(len(size) == 2 and all(s >= 1 for s in size), f"data.{name} must be [H, W], got {list(size)}")
        _check(self.num_classes >= 1, f"data.num_classes must be >= 1, got {self.num_classes}")
        if self.class_weights is not None:
            _check(len(self.class_weights) == self.num_classes,
                   f"data.class_weights needs one weight per class ({self.num_classes}), got {len(self.class_weights)}")
        _check(self.batch_size >= 1 and self.eval_batch_size >= 1,
               "data.batch_size and data.eval_batch_size must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and the unrolled warm-up.

    The schedule is cosine annealing to ``eta_min`` stepped every optimiser step, with no LR warm-up
    (docs/paper_vs_released.md#optimisers-and-schedule); ``pretrain_steps`` counts optimiser steps, not
    epochs (docs/paper_vs_released.md#unrolled-warm-up).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float = 0.0  # L2 added to the gradient (torch Adam/SGD), not AdamW
    epochs: int = 50
    schedule: str = "cosine"
    eta_min: float = 1e-6
    pretrain_steps: int = 0  # optimiser steps run as an unrolled weight-tied stack before the DEQ
    seed: int = 0
    pretrained: str | None = None  # checkpoint whose stem, injection and f_theta initialise this model
    # Jacobian regularisation (Bai, Koltun, Kolter, ICML 2021; the released *_reg.yaml LOSS fields), off at
    # frequency 0: with probability jac_reg_freq per step (JAC_LOSS_FREQ) the loss gets weight x the Hutchinson
    # estimate of ||J_f(z*)||_F^2 / numel(z*) from jac_reg_probes Gaussian probes. The weight is
    # jac_reg_pretrain_weight during the unrolled warm-up (PRETRAIN_JAC_LOSS_WEIGHT), then jac_reg_weight
    # (JAC_LOSS_WEIGHT) + jac_reg_step per jac_reg_step_every optimiser steps after it (0.1 per JAC_INCREMENTAL;
    # null: never), and 0 from epoch jac_reg_stop_epoch on (JAC_STOP_EPOCH; null: never).
    # docs/training_stability.md#jacobian-regularisation
    jac_reg_freq: float = 0.0
    jac_reg_weight: float = 0.0
    jac_reg_pretrain_weight: float = 0.0
    jac_reg_step: float = 0.1
    jac_reg_step_every: int | None = None
    jac_reg_stop_epoch: int | None = None
    jac_reg_probes: int = 2
    # The spectral radius of J_f(z*) by the power method (spectral_radius_iters VJPs) on the first evaluation
    # batch, logged with every spectral_radius_every-th epoch's evaluation (epochs 0, k, 2k, ...; 0: never;
    # the released SPECTRAL_RADIUS_MODE: every 10, 150 iterations). docs/training_stability.md#spectral-radius
    spectral_radius_every: int = 0
    spectral_radius_iters: int = 150

    def __post_init__(self) -> None:
        _check_choice(self.optimizer, OPTIMIZERS, "train.optimizer")
        _check_choice(self.schedule, SCHEDULES, "train.schedule")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(0.0 <= self.momentum < 1.0, f"train.momentum must be in [0, 1), got {self.momentum}")
        _check(not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
               "train.nesterov needs optimizer 'sgd' with momentum > 0")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(0.0 <= self.eta_min < self.lr, f"train.eta_min must be in [0, lr), got {self.eta_min}")
        _check(self.pretrain_steps >= 0, f"train.pretrain_steps must be >= 0, got {self.pretrain_steps}")
        _check(0.0 <= self.jac_reg_freq <= 1.0, f"train.jac_reg_freq must be in [0, 1], got {self.jac_reg_freq}")
        for name in ("jac_reg_weight", "jac_reg_pretrain_weight", "jac_reg_step"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _check(self.jac_reg_step_every is None or self.jac_reg_step_every >= 1,
               f"train.jac_reg_step_every must be null or >= 1, got {self.jac_reg_step_every}")
        weighted = self.jac_reg_weight > 0 or self.jac_reg_pretrain_weight > 0 or (
            self.jac_reg_step > 0 and self.jac_reg_step_every is not None)
        _check((self.jac_reg_freq > 0) == weighted,
               f"train.jac_reg_freq ({self.jac_reg_freq}) and the Jacobian penalty's weights (jac_reg_weight "
               f"{self.jac_reg_weight}, jac_reg_pretrain_weight {self.jac_reg_pretrain_weight}) must be both zero "
               f"(off) or both set: either alone never applies the penalty")
        _check(self.jac_reg_stop_epoch is None or self.jac_reg_stop_epoch >= 0,
               f"train.jac_reg_stop_epoch must be null or >= 0, got {self.jac_reg_stop_epoch}")
        _check(self.jac_reg_probes >= 1, f"train.jac_reg_probes must be >= 1, got {self.jac_reg_probes}")
        _check(self.spectral_radius_every >= 0,
               f"train.spectral_radius_every must be >= 0 (0: never), got {self.spectral_radius_every}")
        _check(self.spectral_radius_iters >= 1,
               f"train.spectral_radius_iters must be >= 1, got {self.spectral_radius_iters}")

    @property
    def jac_reg(self) -> bool:
        """Whether Jacobian regularisation is on (a nonzero frequency; validated to come with a weight)."""
        return self.jac_reg_freq > 0


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: a model of the paper, its solver, data and training settings."""

    name: str
    variant: str  # "paper" (Appendix Table 4), "official" (released yaml), "smoke", "custom"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    solver: SolverConfig = dataclasses.field(default_factory=SolverConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check_choice(self.variant, VARIANTS, "variant")
        expected_head = "segmentation" if self.data.dataset == "cityscapes" else "classification"
        _check(self.model.head == expected_head,
               f"data.dataset {self.data.dataset!r} needs model.head {expected_head!r}, got {self.model.head!r}")
        d = self.model.size_divisor
        for name in ("image_size", "eval_image_size"):
            size = getattr(self.data, name)
            _check(all(s % d == 0 for s in size),
                   f"data.{name} {list(size)} must be divisible by 2^(downsample_times + num_scales - 1) = {d}")


_SECTIONS = {"model": ModelConfig, "solver": SolverConfig, "data": DataConfig, "train": TrainConfig}


def available_configs() -> list[str]:
    """Names of the configs shipped in ``mdeq/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _unknown_key(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; closest match: {close[0]!r}" if close else "; no close match"
    return ConfigError(f"unknown key {key!r} in {where}; valid keys: {sorted(valid)}{hint}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; int->float and list->tuple are the only conversions."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (elem, *rest) = typing.get_args(tp)
        if rest and rest[0] is not Ellipsis:  # fixed length, e.g. tuple[int, int]
            if len(value) != len(typing.get_args(tp)):
                raise ConfigError(f"{where} must be a list of {len(typing.get_args(tp))} values, got {value!r}")
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {where}")  # a bug in this module


def _build(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown_key(str(key), fields, where)
        if key in _SECTIONS and cls is ExperimentConfig:
            kwargs[key] = _build(_SECTIONS[key], value, key)
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where != "config" else key)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where} is missing required keys {missing}")
    return cls(**kwargs)


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build a config from nested plain data, e.g. the dict a checkpoint stored with ``config_to_dict``."""
    return _build(ExperimentConfig, raw, "config")


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Nested plain data (lists, not tuples) for YAML/JSON; ``config_from_dict`` inverts it."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what went wrong and where (line and column, 1-based)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _parse_overrides(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[tuple[list[str], Any]]:
    if overrides is None:
        return []
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        def flatten(prefix: str, m: Mapping[str, Any]) -> None:
            for k, v in m.items():
                key = f"{prefix}{k}"
                if isinstance(v, Mapping) and key in _SECTIONS:
                    flatten(key + ".", v)
                else:
                    items.append((key, v))
        flatten("", overrides)
    elif isinstance(overrides, (list, tuple)):
        for text in overrides:
            if not isinstance(text, str) or "=" not in text:
                raise ConfigError(f"an override must look like 'section.key=value', got {text!r}")
            key, value = text.split("=", 1)
            try:
                items.append((key.strip(), yaml.safe_load(value)))
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
    else:
        raise ConfigError("overrides must be a dict or a list of 'section.key=value' strings, "
                          f"got {type(overrides).__name__}")
    return [(key.split("."), value) for key, value in items]


def _apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    top = [f.name for f in dataclasses.fields(ExperimentConfig)]
    if path[0] not in top:
        raise _unknown_key(path[0], top, "config")
    if path[0] in _SECTIONS:
        if len(path) != 2:
            raise ConfigError(f"override {'.'.join(path)!r} must look like '{path[0]}.key'")
        fields = [f.name for f in dataclasses.fields(_SECTIONS[path[0]])]
        if path[1] not in fields:
            raise _unknown_key(path[1], fields, path[0])
        raw.setdefault(path[0], {})[path[1]] = value
    else:
        if len(path) != 1:
            raise ConfigError(f"override {'.'.join(path)!r}: {path[0]!r} has no sub-keys")
        raw[path[0]] = value


def _resolve_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    names = available_configs()
    if str(name_or_path) not in names:
        close = difflib.get_close_matches(str(name_or_path), names, n=1)
        hint = f"; closest match: {close[0]!r}" if close else ""
        raise ConfigError(f"unknown config {str(name_or_path)!r}; available: {names}{hint}")
    return CONFIG_DIR / f"{name_or_path}.yaml"


def load_config(name_or_path: str | Path,
                overrides: Mapping[str, Any] | Sequence[str] | None = None) -> ExperimentConfig:
    """Load a shipped config by name (``"cifar10_small_official"``) or a YAML file by path.

    ``overrides`` is a dict (``{"solver": {"max_iter": 5}}`` or ``{"solver.max_iter": 5}``) or a list of
    ``"section.key=value"`` strings whose values are parsed with ``yaml.safe_load``. Unknown keys and
    wrong types raise ``ConfigError``.
    """
    path = _resolve_path(name_or_path)
    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    for key_path, value in _parse_overrides(overrides):
        _apply_override(raw, key_path, value)
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path.name}: {err}") from None

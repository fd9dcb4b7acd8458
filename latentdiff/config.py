"""Typed, frozen configuration dataclasses, loaded from YAML with type-checked overrides.

Every YAML file in ``configs/`` is one of the run configs below written out. Unknown keys and
wrong types are errors (``ConfigError``), never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml

from .errors import ConfigError


# ----------------------------------------------------------------------------- model configs
@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the VAE plus the latent normalisation computed after training."""

    in_channels: int = 1  # image channels (MNIST: 1)
    image_size: int = 28  # input height = width
    latent_channels: int = 4  # channels of the latent grid
    channels: tuple[int, ...] = (32, 64, 128)  # width per resolution; len-1 downsamplings (x2 each)
    num_res_blocks: int = 1  # residual blocks per resolution
    groups: int = 8  # GroupNorm groups
    # Latent normalisation, z_scaled = (z - shift_factor) * scaling_factor. Computed from the
    # training latents at the end of VAE training (1/std and mean), so diffusion sees unit variance.
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @property
    def latent_size(self) -> int:
        """Side of the latent grid (28 -> 7 for three resolutions)."""
        size = self.image_size
        for _ in range(len(self.channels) - 1):
            size = (size + 1) // 2
        return size

    def validate(self) -> None:
        _require(self.in_channels >= 1 and self.latent_channels >= 1, "channel counts must be >= 1")
        _require(len(self.channels) >= 1, "vae.channels needs at least one width")
        _require(self.groups >= 1, f"vae.groups must be >= 1, got {self.groups}")
        _require(all(c % self.groups == 0 for c in self.channels),
                 f"every vae.channels entry must be divisible by groups={self.groups}")
        _require(self.scaling_factor > 0, "vae.scaling_factor must be > 0")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the class-conditioned latent UNet."""

    # The latent shape the UNet works on. null (the default): follow the VAE; train_ldm fills both in
    # from the VAE it trains on, a UNet built without one takes the default VAE's (4, 7). A saved
    # unet/config.json always holds the numbers. Odd sizes are fine.
    in_channels: Optional[int] = None  # latent channels
    sample_size: Optional[int] = None  # latent grid side
    channels: tuple[int, ...] = (64, 128)  # width per resolution (7x7, 4x4)
    num_res_blocks: int = 2  # residual blocks per resolution on the way down
    attention_levels: tuple[bool, ...] = (False, True)  # self-attention per resolution
    num_heads: int = 4
    num_classes: int = 10  # label index num_classes is the "no label" (unconditional) token
    groups: int = 8
    dropout: float = 0.0
    # A distilled student (distill.py) takes the guidance scale as an input: unet(x, t, y, w), one batch
    # per step instead of CFG's doubled one. False (the default, and every older config) = a plain UNet.
    guidance_input: bool = False
    # The student's w enters as sinusoidal features of w * guidance_embed_scale, like t. 1000 (LCM's choice, and
    # what students saved before this field load with) puts features of period 0.006 in w: the output zig-zags
    # between nearby w (docs/distillation.md); 10 keeps every feature smooth over w in [0, 3].
    guidance_embed_scale: float = 1000.0

    def validate(self) -> None:
        _require(all(v is None or v >= 1 for v in (self.in_channels, self.sample_size)),
                 "unet.in_channels and unet.sample_size must be >= 1 (or null: follow the VAE)")
        _require(len(self.attention_levels) == len(self.channels),
                 "unet.attention_levels needs one entry per unet.channels entry")
        _require(self.groups >= 1 and self.num_heads >= 1,
                 f"unet.groups and unet.num_heads must be >= 1, got {self.groups} and {self.num_heads}")
        _require(all(c % self.groups == 0 for c in self.channels),
                 f"every unet.channels entry must be divisible by groups={self.groups}")
        _require(all(c % self.num_heads == 0 for c in self.channels),
                 f"every unet.channels entry must be divisible by num_heads={self.num_heads}")
        _require(self.num_classes >= 1, "unet.num_classes must be >= 1")
        _require(0.0 <= self.dropout < 1.0, "unet.dropout must be in [0, 1)")


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and training objective; saved with the pipeline."""

    schedule: str = "cosine"  # cosine | linear
    num_timesteps: int = 1000
    prediction: str = "v"  # eps | v
    label_dropout: float = 0.1  # probability a label is replaced by the null label (for CFG)
    # Loss weight across noise levels: none (plain MSE) | min_snr (Hang et al. 2023, gamma below).
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    # Keys of older versions, dropped when a saved config.json or run config is read: each with the one value
    # that meant what this version does (None: any value, when the others hold). EDM's log-normal noise
    # levels measured worse than uniform + min-SNR and no preset used them (docs/results.md, part 3).
    RETIRED: ClassVar[dict[str, Any]] = {"timestep_sampling": "uniform", "logsnr_mean": None, "logsnr_std": None}

    def validate(self) -> None:
        from .diffusion import LOSS_WEIGHTINGS, PREDICTIONS, SCHEDULES

        _require(self.schedule in SCHEDULES, f"diffusion.schedule must be one of {sorted(SCHEDULES)}")
        _require(self.prediction in PREDICTIONS, f"diffusion.prediction must be one of {PREDICTIONS}")
        _require(self.num_timesteps >= 2, "diffusion.num_timesteps must be >= 2")
        _require(0.0 <= self.label_dropout < 1.0, "diffusion.label_dropout must be in [0, 1)")
        _require(self.loss_weighting in LOSS_WEIGHTINGS, f"diffusion.loss_weighting must be one of {LOSS_WEIGHTINGS}")
        _require(self.min_snr_gamma > 0, "diffusion.min_snr_gamma must be > 0")


@dataclass(frozen=True)
class SampleConfig:
    """The sampling settings, in one type: the ``sample:`` section of a model's config.json (its defaults),
    ``generate``'s and the editing functions' keyword overrides, ``sample.py``'s flags and the server's JSON
    fields all become one of these (``LatentDiffusion.settings``), checked once by ``validate``.
    """

    sampler: str = "dpm++"  # dpm++ | ddim | ddpm | lcm (lcm: distilled students)
    steps: int = 20
    guidance_scale: float = 3.0  # 1 = conditional only, 0 = unconditional, >1 = stronger guidance
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic)
    # Guide only at timesteps lo <= t <= hi of the schedule's 0..T-1 (conditional only elsewhere);
    # null = every step. Saved configs from before this option load as null: the old behaviour.
    guidance_interval: Optional[tuple[int, ...]] = None
    spacing: str = "uniform"  # which timesteps the sampler visits: uniform | trailing | logsnr | karras
    # Autoguidance weight w (Karras et al. 2024): 1 = off; != 1 needs the folder's guide/ model (README).
    autoguidance_scale: float = 1.0
    # Rows per network call when sampling (a digit's bits depend on it, the batch size does not:
    # docs/scale.md); null = the device's default (64 on a CPU, 1024 on a GPU). The pipeline's, not a call's.
    tile_size: Optional[int] = None

    # What the numbers accept (low, high; None = no bound): ``validate`` checks these, and the server builds
    # its JSON schema from them (``steps``' high end is the schedule's T).
    NUMBERS: ClassVar[dict[str, tuple[float, Optional[float]]]] = {
        "guidance_scale": (0.0, None), "autoguidance_scale": (0.0, None), "eta": (0.0, 1.0)}
    NUMBER_HINTS: ClassVar[dict[str, str]] = {"autoguidance_scale": "1 = off",
                                              "eta": "0 = deterministic DDIM, 1 = DDPM's noise"}
    # The settings a call may override (``tile_size`` belongs to the pipeline).
    CALL_KEYS: ClassVar[tuple[str, ...]] = ("guidance_scale", "steps", "sampler", "eta", "guidance_interval",
                                            "spacing", "autoguidance_scale")

    @staticmethod
    def choices(name: str) -> list[str]:
        """The values ``sampler`` or ``spacing`` accept."""
        from .sampling import SAMPLERS
        from .timesteps import SPACINGS

        return sorted({"sampler": SAMPLERS, "spacing": SPACINGS}[name])

    def validate(self, num_timesteps: int | None = None, *, student: bool = False, prefix: str = "sample.") -> None:
        """ConfigError (a ValueError) naming the first bad setting. ``student``: the settings of a distilled student
        (distill.py), which samples with lcm or deterministic ddim and takes the scale at every step."""
        from .sampling import check_guidance_interval

        for name, (lo, hi) in self.NUMBERS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or (hi is not None and v > hi):
                rule = f">= {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
                rule += f" ({self.NUMBER_HINTS[name]})" if name in self.NUMBER_HINTS else ""
                raise ConfigError(f"{prefix}{name} must be a finite number {rule}, got {v!r}")
        for name in ("sampler", "spacing"):
            _require(getattr(self, name) in self.choices(name),
                     f"unknown {prefix}{name} {getattr(self, name)!r}; choose one of {self.choices(name)}")
        top = num_timesteps if num_timesteps is not None else "T"
        _require(not isinstance(self.steps, bool) and isinstance(self.steps, int) and self.steps >= 1
                 and (num_timesteps is None or self.steps <= num_timesteps),
                 f"{prefix}steps must be an integer in 1..{top}, got {self.steps!r}")
        _require(self.tile_size is None or (isinstance(self.tile_size, int) and not isinstance(self.tile_size, bool)
                                            and self.tile_size >= 1),
                 f"{prefix}tile_size must be >= 1 (or null: the device's default)")
        try:
            check_guidance_interval(self.guidance_interval, num_timesteps)
        except ValueError as e:
            raise ConfigError(f"{prefix}{e}") from None
        if student:
            _require(self.sampler == "lcm" or (self.sampler == "ddim" and self.eta == 0),
                     f"{prefix}sampler {self.sampler!r}{' with eta > 0' if self.sampler == 'ddim' else ''} needs the "
                     "teacher: this model is a few-step student whose UNet predicts the end of the teacher's guided "
                     "trajectory; sample it with sampler='lcm' (consistency students) or 'ddim' with eta=0 (progressive "
                     "students)")
            _require(self.guidance_interval is None or (num_timesteps is not None and tuple(self.guidance_interval)
                                                        == (0, num_timesteps - 1)),
                     f"{prefix}guidance_interval needs the teacher: this model is a distilled student that takes the "
                     "guidance scale as an input at every step; pass guidance_scale only")

    def to_kwargs(self) -> dict[str, Any]:
        """The per-call settings as ``generate``'s keyword arguments, JSON-ready (job.json, the server's answers)."""
        out = {k: getattr(self, k) for k in self.CALL_KEYS}
        out["guidance_interval"] = None if self.guidance_interval is None else list(self.guidance_interval)
        return out


# ----------------------------------------------------------------------------- run configs
@dataclass(frozen=True)
class DataConfig:
    """Where MNIST comes from."""

    # Folder with the IDX files (or <root>/MNIST/raw/). null: $LATENTDIFF_DATA, else download
    # with torchvision into ./data.
    root: Optional[str] = None
    download: bool = True  # allow torchvision to download when no local IDX files are found
    # Classes left out of training (e.g. [7]: a base model that has never seen a 7, to measure teaching a new
    # class honestly: bench/teach_protocol.py). Empty: every class.
    exclude_classes: tuple[int, ...] = ()

    def validate(self) -> None:
        _require(all(0 <= c <= 9 for c in self.exclude_classes) and len(set(self.exclude_classes)) < 10
                 and len(set(self.exclude_classes)) == len(self.exclude_classes),
                 f"data.exclude_classes must be distinct MNIST classes 0..9, leaving at least one, "
                 f"got {list(self.exclude_classes)}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping shared by both stages."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 128  # global batch per optimizer step (split over processes x accumulation)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear LR warm-up
    lr_decay: str = "cosine"  # cosine | constant (after warm-up)
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    # EMA of the weights (0 = off); the EMA weights are saved. Warmed up: the decay after step t is
    # min(ema_decay, (1 + t) / (10 + t)), so 0.999 only binds after ~9,000 steps (latentdiff/ema.py).
    ema_decay: float = 0.999
    # Set: EDM2's power-function EMA with this relative width (0.05-0.2) replaces the schedule above.
    ema_std: Optional[float] = None
    # no | fp16 | bf16 | auto (bf16 where the CPU/GPU has native bf16, else fp32: latentdiff/precision.py);
    # null = whatever accelerate launch says
    mixed_precision: Optional[str] = None
    # Experiment trackers through accelerate, e.g. "tensorboard", "tensorboard,wandb" or "all" (every
    # installed one); null = none. metrics.jsonl is always written.
    log_with: Optional[str] = None
    seed: int = 0
    log_every: int = 50
    preview_every: int = 500  # preview grid PNG (0 = only at the end)
    checkpoint_every: int = 500  # 0 = only the final model
    keep_checkpoints: int = 2
    compile: bool = False  # torch.compile the model (GPU)

    def validate(self) -> None:
        _require(self.steps >= 1, "train.steps must be >= 1")
        _require(self.batch_size >= 1 and self.grad_accum >= 1, "train.batch_size/grad_accum must be >= 1")
        _require(self.batch_size < 2**24, "train.batch_size must be below 2^24")
        _require(math.isfinite(self.lr) and self.lr > 0, f"train.lr must be a finite number > 0, got {self.lr}")
        for name in ("warmup_steps", "preview_every", "checkpoint_every", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            _require(math.isfinite(v) and v >= 0, f"train.{name} must be >= 0" + (" (0 = off)" if name in (
                "preview_every", "checkpoint_every", "grad_clip") else "") + f", got {v}")
        _require(self.lr_decay in ("cosine", "constant"), "train.lr_decay must be cosine or constant")
        _require(0.0 <= self.ema_decay < 1.0, "train.ema_decay must be in [0, 1)")
        if self.ema_std is not None:
            _require(0.0 < self.ema_std < 0.28, "train.ema_std must be in (0, 0.28) or null (EDM2 uses 0.05-0.2)")
            _require(self.ema_decay > 0, "train.ema_decay=0 turns the EMA off; drop train.ema_std or set ema_decay > 0")
        _require(self.mixed_precision in (None, "no", "fp16", "bf16", "auto"),
                 "train.mixed_precision must be no, fp16, bf16, auto or null")
        _require(self.log_every >= 1, "train.log_every must be >= 1")
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")


@dataclass(frozen=True)
class VAERunConfig:
    """Everything train_vae needs."""

    out_dir: str = "runs/vae"
    kl_weight: float = 1e-5  # weight of the per-element KL term against per-pixel MSE
    model: VAEConfig = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        _require(self.kl_weight >= 0, "kl_weight must be >= 0")
        self.model.validate()
        self.data.validate()
        self.train.validate()


@dataclass(frozen=True)
class GuideConfig:
    """The autoguidance guide train_ldm keeps: a snapshot of the EMA weights part way through training."""

    # Snapshot the EMA weights (the raw weights without EMA) after this fraction of train.steps into the
    # run folder's guide/; 0 = keep no guide. Karras et al. 2024 guide with a shorter-trained model.
    fraction: float = 0.0

    def validate(self) -> None:
        _require(0.0 <= self.fraction < 1.0, "guide.fraction must be in [0, 1) (0 = no guide)")

    def step(self, steps: int) -> int:
        """The step after which the snapshot is taken (>= 1), or 0 for no guide."""
        return max(1, round(self.fraction * steps)) if self.fraction > 0 else 0


@dataclass(frozen=True)
class LDMRunConfig:
    """Everything train_ldm needs."""

    out_dir: str = "runs/ldm"
    vae_path: str = "runs/vae"  # a saved VAE folder (config.json + model.safetensors)
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)

    def validate(self) -> None:
        self.model.validate()
        self.diffusion.validate()
        self.sample.validate(self.diffusion.num_timesteps)
        self.data.validate()
        self.train.validate()
        self.guide.validate()
        _require(self.sample.autoguidance_scale == 1.0 or self.guide.fraction > 0,
                 f"sample.autoguidance_scale={self.sample.autoguidance_scale} needs a guide: set guide.fraction > 0 "
                 "(e.g. 0.25) or sample.autoguidance_scale=1")


# ----------------------------------------------------------------------------- (de)serialisation
def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def to_dict(cfg: Any) -> dict:
    """A dataclass config as plain JSON/YAML data (tuples become lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def _check_value(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (elem, _ellipsis) = typing.get_args(tp)
        return tuple(_check_value(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 3e-4 as a string: accept numeric literals
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes/off/on as a boolean
            key = where.split(".", 1)[-1]
            raise ConfigError(f"{where}: expected a string, got {value!r} (YAML reads a bare no, yes, off or on as a "
                              f"boolean: quote the value, e.g. --set '{key}=\"no\"')")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass ``cls`` from plain data; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    retired = getattr(cls, "RETIRED", {})
    for key in sorted(set(data) & set(retired)):
        if retired[key] is not None and data[key] != retired[key]:
            raise ConfigError(f"{where}.{key}={data[key]!r} was removed from latentdiff (measured no better; "
                              f"docs/results.md); this version trains with {key}={retired[key]!r}: remove the key")
    data = {k: v for k, v in data.items() if k not in retired}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    kwargs = {k: _check_value(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``a.b=value`` overrides (values parsed as YAML) with the same type checks."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a config section")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown key {parts[-1]!r}; valid keys are {sorted(node)}")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value {raw!r} is not valid YAML ({_yaml_problem(e)}); "
                              "e.g. a list is [1, 2], a string with brackets or colons needs quotes") from None
    return from_dict(type(cfg), data)


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Load a run config from YAML (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file from configs/")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML ({_yaml_problem(e)}); fix it, or start from a "
                              "file in configs/") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not text; pass a YAML file from configs/") from None
        data = loaded or {}
    cfg = from_dict(cls, data, where=str(path) if path else "config")
    cfg = apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what went wrong and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def save_json(cfg: Any, path: str | Path) -> None:
    """Write a config as indented JSON."""
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

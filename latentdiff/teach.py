"""Teach a trained LDM a new class from a few examples.

The UNet's label embedding is a table of vectors, one per class plus the null label, added to the
timestep embedding of every block; teaching appends a row for the new class. Three methods
(``TeachConfig.method``; measured in docs/teaching.md):

- "finetune" (the default): DreamBooth-style (Ruiz et al. 2023): the whole UNet and the new row learn
  from the examples, with prior preservation: half of every batch is digits of the old classes that the
  base model itself generated. The adapter holds the tuned UNet, and the loaded model runs it for the
  taught classes only (``unet.TaughtUNet``): the old classes and the null label keep running the base,
  so they sample bit for bit as before.
- "lora": as finetune (the same objective, prior preservation and routing), but the UNet's weights stay and learn
  low-rank updates (LoRA, Hu et al. 2022, trained with ``peft``: the ``lora`` extra) on every ResBlock's convs and
  embedding projection and every attention's qkv and proj (``LORA_TARGETS``). The adapter holds those factors and
  the new row; loading merges them into a copy of the base UNet (``UNet.with_lora``), so sampling needs no peft.
- "embedding": only the new row learns (textual inversion, Gal et al. 2022, for a class-conditioned
  UNet); every other weight stays, so the old classes sample bit for bit as before, and the adapter is
  a few hundred floats; but a base that never drew the class learns little of its shape.

The result saves as an adapter folder (``adapter.json`` + ``adapter.safetensors``) that names its base
model and the SHA-256 of the base's UNet weights;
``LatentDiffusion.from_pretrained(adapter_folder)`` loads the base and adds the row, and refuses a base
whose weights changed. The base folder is only read.

    pipe = LatentDiffusion.from_pretrained("runs/ldm")
    row = teach(pipe, examples, TeachConfig())                  # examples (K, 1, 28, 28) in [0, 1]
    save_adapter("runs/ldm_star", "runs/ldm", ["star"], row)
    taught = LatentDiffusion.from_pretrained("runs/ldm_star")   # class 10 is "star"
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .diffusion import diffusion_loss
from .edit import check_images
from .errors import ConfigError, ModelLoadError, RunDirError, TrainingDiverged
from .pipeline import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LatentDiffusion, read_adapter
from .serialization import WEIGHTS_NAME, atomic_save_safetensors, file_above, read_tensors, sha256
from .unet import TaughtUNet, UNet

MIN_EXAMPLES = 2
# Adam's default lr per method: every weight of the UNet, low-rank updates of them (3e-3 no better at K = 10: docs/
# teaching.md), or the one new row alone.
LEARNING_RATES = {"finetune": 2e-4, "lora": 1e-3, "embedding": 0.01}
TUNED = ("finetune", "lora")  # methods that change the UNet's weights: prior preservation, and a routed tuned copy
# unet.py's layers that "lora" updates: each ResBlock's conv1, conv2 and emb (the FiLM projection of the timestep and
# label embedding: where a class acts), each Attention's qkv and proj. The in/out convs, skips, resamplers and the
# timestep MLP stay the base's.
LORA_TARGETS = ("conv1", "conv2", "emb", "qkv", "proj")


@dataclass(frozen=True)
class TeachConfig:
    """How the new class's embedding is learned (defaults measured: docs/teaching.md)."""

    method: str = "finetune"  # finetune | lora | embedding (module docstring)
    steps: int = 600  # optimizer steps (K = 10 real 7s: 300 read as 7 in 86.5%, 600 in 93.3%: docs/teaching.md)
    batch_size: int = 64  # examples per step (the few examples, each with its own noise level and augmentation)
    lr: Optional[float] = None  # Adam; None: LEARNING_RATES[method]
    lora_rank: int = 16  # lora: the rank of each update B @ A (scale alpha / r = 1); K = 10 7s: 8 FLD 2.2x, 16 1.7x
    prior_per_class: int = 40  # finetune and lora: digits of each old class generated once by the base, half of every batch
    augment: bool = True  # small random rotations, scales and shifts of the examples, so the row learns the class, not them
    variants: int = 32  # augmented copies of each example, encoded once up front
    seed: int = 0

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else LEARNING_RATES[self.method]

    def validate(self) -> None:
        if self.method not in LEARNING_RATES:
            raise ConfigError(f"teach method must be one of {' | '.join(LEARNING_RATES)}, got {self.method!r}")
        for name in ("steps", "batch_size", "variants", "prior_per_class", "lora_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"teach {name} must be an integer >= 1, got {v!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"teach lr must be a number > 0, got {self.lr!r}")


def _augmented(images: torch.Tensor, cfg: TeachConfig) -> torch.Tensor:
    """(K, 1, 28, 28) -> (K * variants, 1, 28, 28): each example in ``variants`` small affine variants (the first
    unchanged), or the examples themselves without augmentation."""
    if not cfg.augment:
        return images
    from .evaluate.classifier import random_affine  # the evaluator's augmentation: +-10 degrees, +-10% scale, +-2 px

    g = torch.Generator().manual_seed(cfg.seed)
    x = images.repeat_interleave(cfg.variants, 0)
    moved = random_affine(x, g).clamp(0, 1)
    moved[::cfg.variants] = images
    return moved


def teach(pipe: LatentDiffusion, images: torch.Tensor, config: TeachConfig | None = None,
          progress: bool = False, callback: Callable[[int, int], None] | None = None) -> UNet:
    """The pipeline's UNet grown by one class, taught from ``images`` (K, 1, 28, 28) in [0, 1]: its index is the old
    ``num_classes``. The new row starts from the mean of the old classes' rows; "embedding" trains that row alone,
    "finetune" every weight and "lora" low-rank updates of the weights, both with prior preservation (Adam, the
    model's own objective without label dropout). A LoRA-taught UNet is the base's grown by the taught rows with
    the factors merged (``UNet.with_lora``), and keeps them (``.lora``). ``pipe`` is only read.
    ``callback(step, steps)`` runs after every optimizer step (a server's progress); an exception it raises stops
    teaching.
    """
    cfg = config or TeachConfig()
    cfg.validate()
    routed = isinstance(pipe.unet, TaughtUNet)
    net = pipe.unet.tuned if routed else pipe.unet  # taught before: go on from the tuned copy
    merged = net.lora if routed else {}  # the factors over the base in that copy; None: it is a finetune's
    if cfg.method == "lora":
        if merged is None:
            raise ValueError("teach method lora adds low-rank updates to the base UNet, but this model's taught classes "
                             "run a fine-tuned copy of all of it; teach it with method finetune, or with lora on the base")
        inject = _require_peft()
    x = check_images(images, "teach")
    if x.shape[0] < MIN_EXAMPLES:
        raise ValueError(f"teach needs at least {MIN_EXAMPLES} examples of the new class, got {x.shape[0]}; "
                         "draw or collect a few more (5-10 work: docs/teaching.md)")
    if pipe.unet.config.guidance_input:
        raise ValueError("teach needs a teacher model, not a distilled student: pass the LDM folder")
    latents = torch.cat([pipe.encode(part) for part in _augmented(x, cfg).split(256)])  # (N, C, h, w) scaled
    k = pipe.unet.config.num_classes  # the new class's index; the null label moves to k + 1
    labels = torch.full((len(latents),), k, dtype=torch.long, device=pipe.device)
    half = cfg.batch_size
    if cfg.method in TUNED:  # prior preservation: the base's own digits of every old class
        prior_labels = torch.arange(k, device=pipe.device).repeat(cfg.prior_per_class)
        seeds = torch.arange(len(prior_labels)) + cfg.seed
        prior = torch.cat([pipe.sample(pipe.noise(seeds[i:i + 256]), prior_labels[i:i + 256], seeds[i:i + 256],
                                       pipe.settings()) for i in range(0, len(prior_labels), 256)])
        half = max(1, cfg.batch_size // 2)
    start = net.class_embed.weight.detach()[:k].mean(0, keepdim=True)
    unet = net.with_classes(start).train()
    if cfg.method == "finetune":
        params = list(unet.parameters())
    else:
        unet.requires_grad_(False)
        params = inject(unet, cfg.lora_rank, cfg.seed) if cfg.method == "lora" else []  # frozen weights, trainable factors
        table = unet.class_embed.weight
        table.requires_grad_(True)
        keep = torch.ones_like(table, dtype=torch.bool)
        keep[k] = False
        table.register_hook(lambda grad: grad.masked_fill(keep, 0))  # only the new row learns; the others stay exact
        params.append(table)
    opt = torch.optim.Adam(params, lr=cfg.learning_rate)
    g = torch.Generator().manual_seed(cfg.seed)
    objective = replace(pipe.config.diffusion, label_dropout=0.0)
    abar = pipe.alphas_cumprod.float().to(pipe.device)
    for step in tqdm(range(cfg.steps), disable=not progress, desc="teach", leave=False):
        idx = torch.randint(0, len(latents), (half,), generator=g)
        z, y = latents[idx], labels[idx]
        if cfg.method in TUNED:
            j = torch.randint(0, len(prior), (cfg.batch_size - half,), generator=g)
            z, y = torch.cat([z, prior[j]]), torch.cat([y, prior_labels[j]])
        loss = diffusion_loss(unet, z, y, abar, objective, k + 1, generator=g)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the teaching loss became {loss.item()}; try a lower lr (now {cfg.learning_rate})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step + 1, cfg.steps)
    unet = unet.eval().requires_grad_(False)
    # LoRA factors to merge: this method's, or those of the copy a LoRA teaching made before (a finetune's copy has
    # none: merged is None, and lora on it was refused above)
    has_factors = cfg.method == "lora" or (routed and merged is not None)
    if cfg.method == "finetune" or not has_factors:
        return unet
    # LoRA, or a row taught beside LoRA updates: the base grown by every taught row, with every factor merged (this
    # method's appended along the rank), built as the adapter's loader builds it, so both give the same bits.
    base = pipe.unet.base if routed else pipe.unet
    if cfg.method == "lora":
        merged = _concat(merged, _factors(unet))
    return base.with_classes(unet.class_embed.weight[base.config.num_classes:-1]).eval().with_lora(merged)


def _require_peft() -> Callable[[torch.nn.Module, int, int], list[torch.nn.Parameter]]:
    """``inject(unet, rank, seed)``: LoRA layers (peft) added in place on ``LORA_TARGETS``, their parameters returned."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("teach method lora needs the peft package: pip install 'latentdiff[lora]' "
                          "(from a checkout: pip install -e '.[lora]')") from None

    def inject(unet: torch.nn.Module, rank: int, seed: int) -> list[torch.nn.Parameter]:
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
        with torch.random.fork_rng(devices=[]):  # peft draws A from the global generator: seed it, leave it as it was
            torch.manual_seed(seed)
            inject_adapter_in_model(config, unet)  # B starts at zero: the update is 0 until it learns
        return [p for name, p in unet.named_parameters() if ".lora_" in name]

    return inject


def _factors(unet: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} of a peft-injected UNet's LoRA layers, B (out, r) with the layer's scale folded in."""
    from peft.tuners.lora import LoraLayer

    return {name: (m.lora_A["default"].weight.detach().clone(),
                   m.lora_B["default"].weight.detach().flatten(1) * m.scaling["default"])
            for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


def _concat(old: dict, new: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two sets of factors as one: per layer, the ranks side by side (B1 A1 + B2 A2 = [B1 B2] [A1; A2])."""
    out = dict(old)
    for name, (a, b) in new.items():
        out[name] = (torch.cat([old[name][0], a]), torch.cat([old[name][1], b], 1)) if name in old else (a, b)
    return out


def base_of(model_dir: str | Path) -> tuple[Path, list[str], torch.Tensor | None]:
    """(the base LDM folder, the class names an adapter there already adds, its rows or None) of a model folder."""
    model_dir = Path(model_dir).resolve()
    if not (model_dir / ADAPTER_CONFIG).is_file():
        return model_dir, [], None
    base, _, names = read_adapter(model_dir)
    return base, names, read_tensors(model_dir / ADAPTER_WEIGHTS)["class_embed"]


def save_adapter(out_dir: str | Path, base_dir: str | Path, class_names: list[str], rows: torch.Tensor,
                 info: dict | None = None, unet: UNet | None = None,
                 lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """Write the taught classes as an adapter folder: adapter.json (base, base UNet SHA-256, names, ``info``) and
    adapter.safetensors (rows (k, E); with ``unet``, a tuned UNet's every weight as "unet.<name>"; with ``lora``,
    the factors over the base as "lora.<module>.A" and ".B"). Written to a temporary folder first and moved into
    place whole."""
    out_dir, base_dir = Path(out_dir), Path(base_dir).resolve()
    if rows.shape[0] != len(class_names):
        raise ValueError(f"{rows.shape[0]} embedding rows for {len(class_names)} class names")
    tensors = {"class_embed": rows.detach().float().cpu().clone()}
    if unet is not None:
        tensors.update({f"unet.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()})
    for name, (a, b) in (lora or {}).items():
        tensors.update({f"lora.{name}.A": a.detach().cpu().contiguous(), f"lora.{name}.B": b.detach().cpu().contiguous()})
    weights = base_dir / "unet" / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelLoadError(f"{base_dir} is not an LDM folder (no unet/{WEIGHTS_NAME}); pass the base model")
    meta = {"kind": "taught classes", "base": str(base_dir), "base_unet_sha256": sha256(weights),
            "class_names": list(class_names), **(info or {})}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        atomic_save_safetensors(tensors, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not claim(tmp, out_dir):  # another run made out_dir while this one taught: keep this work beside it
        kept = next(p for p in (out_dir.with_name(f"{out_dir.name}-{i}") for i in itertools.count(2)) if claim(tmp, p))
        raise RunDirError(f"{out_dir} was made by another run while this one taught; it is left as it is, and this "
                          f"run's adapter is saved as {kept}")
    return out_dir


def claim(folder: Path, name: Path) -> bool:
    """Move the finished ``folder`` to ``name`` if nothing is there; False if something is. mkdir is the atomic test
    (a rename alone would replace an empty folder, or fail on a full one after the check); the rename then
    replaces the empty folder this call made."""
    try:
        name.mkdir()
    except FileExistsError:
        return False
    folder.replace(name)
    return True


def check_name(pipe: LatentDiffusion, name: str) -> str:
    """A new class name: non-empty, printable, not one the model already has."""
    if not isinstance(name, str) or not name.strip() or not name.isprintable() or len(name) > 40:
        raise ValueError(f"the new class's name must be 1-40 printable characters, got {name!r}")
    if name.strip() in pipe.class_names:
        raise ValueError(f"the model already has a class named {name.strip()!r} (its classes: {pipe.class_names}); "
                         "pick another name")
    return name.strip()


def taught_pipeline(pipe: LatentDiffusion, unet: UNet, name: str, config: TeachConfig | None = None) -> LatentDiffusion:
    """``pipe`` with the class that ``teach(pipe, ..., config)`` taught (``unet``) added as ``name``, in memory: what
    ``LatentDiffusion.from_pretrained`` of its adapter folder loads. A new pipeline sharing ``pipe``'s VAE and base
    UNet; ``pipe`` is unchanged. A finetune's or LoRA's UNet, or any UNet taught after one, serves the taught classes
    only."""
    routed = (config or TeachConfig()).method in TUNED or isinstance(pipe.unet, TaughtUNet)
    return pipe.with_taught(unet, [name], routed)


def save_taught(out_dir: str | Path, base_dir: str | Path, pipe: LatentDiffusion, names: list[str],
                info: dict | None = None) -> Path:
    """Write the classes ``names`` that ``pipe`` (a ``taught_pipeline``) adds to the base LDM at ``base_dir`` as an
    adapter folder (``save_adapter``): their rows, and when the pipeline routes taught classes to a tuned UNet, its
    LoRA factors (``UNet.lora``) or else the whole tuned UNet."""
    routed = isinstance(pipe.unet, TaughtUNet)
    unet = pipe.unet.tuned if routed else pipe.unet
    rows = unet.class_embed.weight.detach()[-1 - len(names):-1]  # every taught row: after the base's, before null
    whole = routed and unet.lora is None
    return save_adapter(out_dir, base_dir, names, rows, info, unet if whole else None, unet.lora if routed else None)


def teach_folder(model_dir: str | Path, images: torch.Tensor, name: str, out_dir: str | Path,
                 config: TeachConfig | None = None, device: str = "cpu", progress: bool = False) -> Path:
    """teach.py's work: load ``model_dir`` (an LDM or an earlier adapter), teach ``name`` from ``images``, write the
    adapter with every class taught so far to ``out_dir`` (a new folder). Nothing is written if anything fails."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise RunDirError(f"{out_dir} exists; pass a new --out folder (the model folders are never overwritten)")
    above = file_above(out_dir)
    if above is not None:  # it would fail only when the adapter is written, after the teaching
        raise RunDirError(f"--out {out_dir} lies under the file {above}, not a folder; choose another --out")
    pipe = LatentDiffusion.from_pretrained(model_dir, device)
    name = check_name(pipe, name)
    cfg = config or TeachConfig()
    base, names, _ = base_of(model_dir)
    taught = taught_pipeline(pipe, teach(pipe, images, cfg, progress), name, cfg)
    return save_taught(out_dir, base, taught, [*names, name], {"teach": asdict(cfg), "examples": int(images.shape[0])})


"""Shared command-line plumbing for the thin scripts: config + overrides, one-line errors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .config import load_config
from .errors import ConfigError, LatentDiffError
from .serialization import file_above

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def presets(stage: str) -> list[str]:
    """The preset names of a stage: configs/<stage>_<name>.yaml."""
    return sorted(p.stem.removeprefix(f"{stage}_") for p in CONFIG_DIR.glob(f"{stage}_*.yaml"))


def resolve_config_path(value: str, stage: str) -> Path:
    """A YAML path, or a preset name like ``quick`` meaning configs/<stage>_quick.yaml."""
    path = Path(value)
    if path.is_file() or value.endswith((".yaml", ".yml")):
        return path
    if value not in presets(stage):
        raise ConfigError(f"unknown preset {value!r}; choose one of {' | '.join(presets(stage))} "
                          f"(configs/{stage}_<name>.yaml) or pass a YAML file")
    return CONFIG_DIR / f"{stage}_{value}.yaml"


def training_parser(stage: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="quick",
                   help=f"YAML file, or a preset name: {' | '.join(presets(stage))} (default: quick)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=500 (repeatable)")
    p.add_argument("--out", help="output run folder (overrides out_dir)")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (default: $LATENTDIFF_DATA, else ./data; "
                   "downloaded there if missing)")
    p.add_argument("--resume", metavar="latest|CHECKPOINT", help="continue a run from its newest (or a given) checkpoint; "
                   "latest with no checkpoint yet starts a fresh run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output folder")
    p.add_argument("--log-with", metavar="TRACKER", help="also log to experiment trackers through accelerate: "
                   "tensorboard, wandb, ... (comma-separated) or all installed ones (overrides train.log_with)")
    return p


def load_run_config(cls: type, args: argparse.Namespace, stage: str, extra: list[str] | None = None):
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    if args.data_dir:
        overrides.append(f"data.root={args.data_dir}")
    if getattr(args, "log_with", None):
        overrides.append(f"train.log_with={args.log_with}")
    return load_config(cls, resolve_config_path(args.config, stage), overrides + (extra or []))


def check_output_file(path: str | Path, flag: str, example: str) -> Path:
    """An output file name, checked before the work that fills it: not a folder, not under a file. ValueError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; pass a file name, e.g. {flag} {path / example}")
    above = file_above(path)
    if above is not None:
        raise ValueError(f"{flag} {path}: {above} is a file, not a folder; choose another {flag}")
    return path


def check_output_image(path: str | Path, flag: str = "--out") -> Path:
    """An output image name (PNG, JPEG, ...) that PIL can write, checked before the work that fills it."""
    from PIL import Image

    path = check_output_file(path, flag, "out.png")
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        what = f"the extension {path.suffix}" if path.suffix else "no extension"
        raise ValueError(f"{flag} {path}: PIL writes no image format with {what}; end the name in .png (or .jpg, .webp, ...)")
    return path


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output folder name (made if missing), checked before the work that fills it: not a file, not under one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    above = file_above(path)
    if above is not None:
        raise ValueError(f"{flag} {path} lies under the file {above}, not a folder; choose another {flag}")
    return path


def end_process_group() -> None:
    """Destroy the process group a launcher's run made (accelerate's or torchrun's), while the interpreter is whole.

    A process that exits with a gloo group alive can abort at interpreter teardown ("terminate called without an
    active exception", SIGABRT): gloo's worker threads still hold work when Python is being torn down (a known PyTorch
    problem, pytorch/pytorch#190489). Seen as a rare failure of a finished 2-process ``sample.py --out-dir`` run.
    Local to this process: no collective, so a rank that failed does not wait on the others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_main(fn: Callable[[], None]) -> None:
    """Run a script body; expected failures print one line and exit 2 (no traceback). A process group the
    body started is destroyed on the way out, however it ends (end_process_group)."""
    try:
        fn()
    except (LatentDiffError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; resume with --resume latest", file=sys.stderr)
        sys.exit(130)
    finally:
        end_process_group()

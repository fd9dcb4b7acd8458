"""Teach a trained LDM a new class from a few examples (latentdiff.teach; methods and measurements: docs/teaching.md).

    python teach.py --model runs/ldm --images my_stars/ --name star --out runs/ldm_star
    python teach.py --model runs/ldm --images sevens.npz --name seven --out runs/ldm_seven --steps 400
    python teach.py --model runs/ldm --images my_stars/ --name star --out runs/ldm_star_lora --method lora   # peft
    python sample.py --model runs/ldm_star --labels 10 --per-label 16 --out stars.png    # class 10 is "star"

--images: a folder of PNG files (one digit-like drawing each, white on black, square, any size; scaled to
28x28) or an .npz with ``images`` (K, 28, 28) uint8. The base folder is only read; --out must be new.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from latentdiff.cli import run_main
from latentdiff.drawings import check_ground, grey
from latentdiff.teach import LEARNING_RATES, TeachConfig, teach_folder


def read_examples(path: str) -> torch.Tensor:
    """(K, 1, 28, 28) float in [0, 1] from a folder of PNGs or an .npz with ``images`` (K, 28, 28) uint8."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".png")
        if not files:
            raise ValueError(f"--images {p} holds no .png files; put one drawing per PNG there")
        out = []
        for f in files:
            try:
                img = grey(Image.open(f))  # 16-bit grey scaled, transparency on black
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"--images: {f} is not a readable PNG ({e})") from None
            if img.width != img.height or img.width < 28:
                raise ValueError(f"--images: {f} is {img.width}x{img.height}; each drawing must be square, "
                                 "at least 28x28 (white on black)")
            out.append(np.asarray(img.resize((28, 28), Image.BILINEAR), dtype=np.float32) / 255)
            check_ground(out[-1], f"--images: {f}")
        return torch.from_numpy(np.stack(out))[:, None]
    if p.suffix == ".npz" and p.is_file():
        try:
            arr = np.load(p)["images"]
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"--images {p}: expected an .npz with an 'images' array (K, 28, 28) uint8 ({e})") from None
        if arr.ndim != 3 or arr.shape[1:] != (28, 28) or arr.dtype != np.uint8:
            raise ValueError(f"--images {p}: 'images' must be (K, 28, 28) uint8, got {arr.shape} {arr.dtype}")
        arr = arr.astype(np.float32) / 255
        for i, digit in enumerate(arr):
            check_ground(digit, f"--images {p}: images[{i}]")
        return torch.from_numpy(arr)[:, None]
    if not p.exists():
        raise FileNotFoundError(f"--images {p} does not exist; pass a folder of PNGs or an .npz file")
    raise ValueError(f"--images {p} is neither a folder of PNGs nor an .npz file")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the LDM folder to teach (or an earlier teach.py --out folder)")
    p.add_argument("--images", required=True, help="folder of PNGs, or an .npz with 'images' (K, 28, 28) uint8")
    p.add_argument("--name", required=True, help="the new class's name (not one the model has)")
    p.add_argument("--out", required=True, help="a new folder for the taught model (the adapter)")
    p.add_argument("--method", choices=list(LEARNING_RATES), default=TeachConfig.method,
                   help="finetune: the whole UNet with prior preservation (the default); lora: low-rank updates of it "
                        "instead, a smaller adapter (needs peft: pip install 'latentdiff[lora]'); embedding: one label "
                        "row alone (docs/teaching.md)")
    p.add_argument("--lora-rank", type=int, default=TeachConfig.lora_rank, help="--method lora: the updates' rank")
    p.add_argument("--steps", type=int, default=TeachConfig.steps)
    p.add_argument("--seed", type=int, default=TeachConfig.seed)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    examples = read_examples(args.images)
    out = teach_folder(args.model, examples, args.name, args.out,
                       TeachConfig(method=args.method, steps=args.steps, seed=args.seed,
                                   lora_rank=args.lora_rank), args.device, progress=True)
    from latentdiff import LatentDiffusion

    names = LatentDiffusion.from_pretrained(out).class_names
    print(f"taught {args.name!r} from {len(examples)} examples as class {names.index(args.name.strip())}: {out} "
          f"(sample it with: python sample.py --model {out} --labels {names.index(args.name.strip())})")


if __name__ == "__main__":
    run_main(main)

"""Teaching a new class, measured honestly: a base that never saw digit D learns it from K real examples.

    accelerate launch train_ldm.py --config quick --vae runs/vae --out runs/ldm_no7 --set data.exclude_classes=[7]
    python bench/teach_protocol.py --base runs/ldm_no7 --full runs/ldm --digit 7 --k 5 10 50 --data-dir DIR \\
        --out bench/results/cpu/issue34/teach_protocol.jsonl      # --method finetune (the default) | lora | embedding

For each K: K training examples of the digit (a seeded draw), ``teach`` (timed), then N digits of the taught class
scored by the evaluator's classifier (the share read as the digit) and by their FLD to the real test digits of
that class (the per-class FLD), beside the same figures for the model that saw the digit in training (``--full``)
and for real training digits (the floor). Copying: each generated digit's pixel distance to its nearest taught
example against its distance to the nearest other real training digit of the class (medians; a copier's first
median falls far below its second). Each taught row also records the method's lr (and rank) and the adapter's size.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hand_swap import append_jsonl  # noqa: E402
from latentdiff import LatentDiffusion  # noqa: E402
from latentdiff.data import load_mnist  # noqa: E402
from latentdiff.evaluate.classifier import extract, load_or_train_classifier  # noqa: E402
from latentdiff.evaluate.metrics import frechet_distance_features  # noqa: E402
from latentdiff.teach import LEARNING_RATES, TeachConfig, teach_folder  # noqa: E402


def nearest(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) distance from each row of a (N, D) to its nearest row of b (M, D)."""
    return torch.cdist(a.double(), b.double()).min(1).values


def score(clf, images: torch.Tensor, digit: int, real_feats: torch.Tensor) -> dict:
    feats, logits = extract(clf, images)
    return {"read_as_digit": float((logits.argmax(1) == digit).double().mean()),
            "fld_vs_test": frechet_distance_features(feats, real_feats)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="an LDM trained without --digit (data.exclude_classes)")
    p.add_argument("--full", help="an LDM that saw the digit (for the side-by-side figures)")
    p.add_argument("--digit", type=int, default=7)
    p.add_argument("--k", type=int, nargs="+", default=[5, 10, 50])
    p.add_argument("--n", type=int, default=1000, help="generated digits per model")
    p.add_argument("--steps", type=int, default=TeachConfig.steps, help="teaching steps")
    p.add_argument("--method", default=TeachConfig.method, choices=list(LEARNING_RATES))
    p.add_argument("--lr", type=float, help="teaching lr (default: the method's, latentdiff.teach.LEARNING_RATES)")
    p.add_argument("--lora-rank", type=int, default=TeachConfig.lora_rank)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir")
    p.add_argument("--classifier")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="append JSON lines here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clf = load_or_train_classifier(args.classifier, args.data_dir)
    train_u8, train_labels = load_mnist(args.data_dir, "train")
    test_u8, test_labels = load_mnist(args.data_dir, "test")
    real_test = test_u8[test_labels == args.digit].float().div(255).unsqueeze(1)
    real_feats = extract(clf, real_test)[0]
    pool = train_u8[train_labels == args.digit].float().div(255).unsqueeze(1)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))
    rows = [{"model": "real training digits (floor)", **score(clf, pool[order[-args.n:]], args.digit, real_feats)}]
    if args.full:
        full = LatentDiffusion.from_pretrained(args.full)
        rows.append({"model": f"{args.full} (saw the digit)",
                     **score(clf, full.generate([args.digit] * args.n, seed=args.seed), args.digit, real_feats)})
    base = LatentDiffusion.from_pretrained(args.base)
    old_classes = torch.tensor([c for c in range(10) if c != args.digit] * 100)

    def old_accuracy(pipe: LatentDiffusion) -> float:
        return float((extract(clf, pipe.generate(old_classes, seed=2))[1].argmax(1) == old_classes).double().mean())

    rows.append({"model": f"{args.base} (never saw the digit): its other classes", "old_classes_accuracy": old_accuracy(base)})
    for k in args.k:
        taught_examples, others = pool[order[:k]], pool[order[k:]]
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            config = TeachConfig(method=args.method, steps=args.steps, seed=args.seed, lr=args.lr, lora_rank=args.lora_rank)
            out = teach_folder(args.base, taught_examples, f"taught {args.digit}", Path(tmp) / "taught", config)
            seconds = time.perf_counter() - t0
            adapter_bytes = sum(f.stat().st_size for f in out.iterdir())
            taught = LatentDiffusion.from_pretrained(out)
            new = taught.num_classes - 1
            images = taught.generate([new] * args.n, seed=args.seed).cpu()
            old = torch.equal(base.generate(list(range(10)), seed=1), taught.generate(list(range(10)), seed=1))
        flat = images.flatten(1)
        old_acc = old_accuracy(taught)
        rows.append({"model": f"base + taught from K = {k} ({args.method})", "k": k, "method": args.method,
                     "lr": config.learning_rate, **({"lora_rank": args.lora_rank} if args.method == "lora" else {}),
                     "teach_seconds": round(seconds, 1), "adapter_bytes": adapter_bytes, "old_classes_accuracy": old_acc,
                     **score(clf, images, args.digit, real_feats), "old_classes_bit_identical": old,
                     "median_nearest_taught": float(nearest(flat, taught_examples.flatten(1)).median()),
                     "median_nearest_other_real": float(nearest(flat, others.flatten(1)).median())})
    for row in rows:
        row.update(digit=args.digit, n=args.n, steps=args.steps, machine=platform.processor() or platform.machine(),
                   threads=torch.get_num_threads())
        print(json.dumps(row), flush=True)
        append_jsonl(args.out, row)


if __name__ == "__main__":
    main()

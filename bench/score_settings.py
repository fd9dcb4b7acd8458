"""Score one or more LDM folders at many sampling settings with one loaded classifier.

    python bench/score_settings.py --models runs/ldm other/ldm --n-per-class 500 \
        --settings '{"guidance_scale": 1.5}' '{"guidance_scale": 2.0, "guidance_interval": [100, 800]}' \
        --out scores.jsonl

Each setting is a JSON object of keyword arguments for ``LatentDiffusion.generate`` (so any option the
pipeline gains can be swept without changing this script). Every line of the output is one
(model, setting) with all metrics next to the real-data floor at the same N. Used by the one-shot GPU
script (bench/gpu_session.sh) to compare training variants, each at its own best guidance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from latentdiff import LatentDiffusion  # noqa: E402
from latentdiff.evaluate import (extract, load_or_train_classifier, real_floor, reference_set,  # noqa: E402
                                 sample_metrics)


@torch.no_grad()
def score(pipe: LatentDiffusion, clf, ref, n_per_class: int, kwargs: dict, seed: int, batch_size: int) -> dict:
    """Class-balanced samples at one setting -> metrics and digits/s of generation."""
    labels = torch.arange(pipe.num_classes).repeat_interleave(n_per_class)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    images = torch.cat([pipe.generate(labels[i:i + batch_size], seed=seed + i, batch_size=batch_size, **kwargs).cpu()
                        for i in range(0, len(labels), batch_size)])
    gen_s = time.perf_counter() - t
    feats, logits = extract(clf, images)
    m = sample_metrics(feats, logits, labels, ref, num_classes=clf.config.num_classes)
    m.pop("fld_per_class", None)
    return {**m, "generate_s": gen_s, "digits_per_s": len(labels) / gen_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="LDM run folders")
    p.add_argument("--settings", nargs="+", default=["{}"], help="JSON objects of generate() keyword arguments")
    p.add_argument("--n-per-class", type=int, default=500)
    p.add_argument("--data-dir")
    p.add_argument("--classifier", help="classifier folder (trained there if missing)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 5000 on a GPU, 500 on a CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="append one JSON line per (model, setting) here")
    args = p.parse_args()
    settings = [json.loads(s) for s in args.settings]
    bs = args.batch_size or (5000 if args.device.startswith("cuda") else 500)
    clf = load_or_train_classifier(args.classifier, args.data_dir, args.device)
    ref = reference_set(clf, args.data_dir)
    floor = real_floor(clf, args.data_dir, ref, args.n_per_class, args.seed)
    print(f"floor at N={10 * args.n_per_class}: fld {floor['fld']:.3f}, per-class {floor['fld_per_class_mean']:.3f}, "
          f"recall {floor['recall']:.3f}, accuracy {100 * floor['accuracy']:.2f}%", flush=True)
    for model in args.models:
        pipe = LatentDiffusion.from_pretrained(model, device=args.device)
        for kw in settings:
            m = score(pipe, clf, ref, args.n_per_class, kw, args.seed, bs)
            rec = {"model": model, "setting": kw, "n": m["n"], "metrics": m,
                   "ratios": {"fld": m["fld"] / floor["fld"], "fld_per_class": m["fld_per_class_mean"] / floor["fld_per_class_mean"],
                              "recall": m["recall"] / floor["recall"]},
                   "floor": {k: floor[k] for k in ("fld", "fld_per_class_mean", "recall", "precision", "accuracy")}}
            r = rec["ratios"]
            print(f"{model} {json.dumps(kw)}: acc {100 * m['accuracy']:.2f}% (worst {100 * m['worst_class_accuracy']:.1f}%) "
                  f"fld {m['fld']:.3f} ({r['fld']:.2f}x) per-class {r['fld_per_class']:.2f}x recall {r['recall']:.2f}x "
                  f"[{m['digits_per_s']:,.0f} digits/s]", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

"""Train a second judging classifier, of another shape and seed, to cross-check a gain seen by the first.

    python bench/second_judge.py --data-dir DIR --out ~/.cache/latentdiff/judge2
    python -m latentdiff.evaluate ldm --model runs/ldm --data-dir DIR --classifier ~/.cache/latentdiff/judge2

The default judge (latentdiff/evaluate/classifier.py) is a 32-64-128 VGG-style CNN with a 128-wide feature
layer; this one is 24-48-96 with a 64-wide feature layer, trained from seed 1: a different feature space for
FLD and precision/recall. A change of default should show in both (docs/results.md). ~3 min on one CPU core.
"""

import argparse

import torch

from latentdiff.evaluate.classifier import ClassifierConfig, train_classifier

SECOND_JUDGE = ClassifierConfig(channels=(24, 48, 96), convs_per_stage=(1, 1, 2), feature_dim=64, dropout=0.2)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: $LATENTDIFF_DATA or a download)")
    p.add_argument("--out", required=True, help="the classifier folder to write")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="stop early (tests)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    _, info = train_classifier(a.data_dir, a.out, "cpu", seed=a.seed, config=SECOND_JUDGE, max_steps=a.max_steps)
    print(f"second judge in {a.out}: test accuracy {info['test_accuracy']:.2%}, {info['train_wall_s']:.0f} s")

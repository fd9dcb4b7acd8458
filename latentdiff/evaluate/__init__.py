"""Evaluation: an MNIST classifier as the judge, metrics against the test digits, sweeps, a CLI.

    classifier.py  the judge network, its training and its cache folder
    metrics.py     pure functions: accuracy, PSNR, Frechet distance, k-NN precision/recall
    score.py       the reference set, real-data floors, scoring the LDM / the VAE / any image set
    samples.py     reading another generator's samples from an .npz (validated)
    sweep.py       the one sweep driver: guidance x interval x any generate() keyword, sampler x steps, explicit settings
    commands.py    ``python -m latentdiff.evaluate classifier|ldm|vae|sweep|samples|plot``
Figures are drawn by latentdiff.plot.
"""

from .classifier import (CLASSIFIER_ENV, DEFAULT_CLASSIFIER, MNIST_MEAN, MNIST_STD, TRAIN_INFO, Classifier,
                         ClassifierConfig, classifier_info, default_classifier_path, extract, load_or_train_classifier,
                         random_affine, to_unit, train_classifier)
from .commands import build_parser, format_table, main, metric_rows, write_json
from .metrics import (Reference, balanced_subset, class_accuracy, frechet_distance, frechet_distance_features,
                      gaussian_stats, knn_radii, manifold_coverage, precision_recall, psnr, sample_metrics)
from .samples import load_samples
from .score import evaluate_ldm, evaluate_vae, generate_balanced, real_floor, reference_set, score_images
from .sweep import (choose_default, parse_assignment, parse_interval, parse_sampler, parse_setting, pick_best, run_sweep,
                    setting_name, summary_line, sweep_options, sweep_table)


def __getattr__(name: str):
    if name == "sweep_plot":  # re-exported lazily: matplotlib loads only when a figure is drawn
        from ..plot import sweep_plot

        return sweep_plot
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLASSIFIER_ENV", "DEFAULT_CLASSIFIER", "MNIST_MEAN", "MNIST_STD", "TRAIN_INFO", "Classifier", "ClassifierConfig",
    "classifier_info", "default_classifier_path", "extract", "load_or_train_classifier", "random_affine", "to_unit",
    "train_classifier", "build_parser", "format_table", "main", "metric_rows", "write_json", "Reference",
    "balanced_subset", "class_accuracy", "frechet_distance", "frechet_distance_features", "gaussian_stats", "knn_radii",
    "manifold_coverage", "precision_recall", "psnr", "sample_metrics", "load_samples", "evaluate_ldm", "evaluate_vae",
    "generate_balanced", "real_floor", "reference_set", "score_images", "choose_default", "parse_interval", "parse_sampler",
    "run_sweep", "setting_name", "summary_line", "sweep_plot", "parse_assignment", "parse_setting", "pick_best",
    "sweep_options", "sweep_table",
]

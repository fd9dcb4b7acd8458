"""`python -m latentdiff.evaluate samples FILE.npz`: any generator's samples, scored like ours; bad files refused."""

import json
import sys

import numpy as np
import pytest
import torch

from conftest import BIN, REPO, run_cmd, synthetic_digits, tiny_pipeline
from latentdiff.data import load_mnist
from latentdiff.errors import DataError
from latentdiff.evaluate import (ClassifierConfig, extract, load_samples, main, real_floor, reference_set,
                                 sample_metrics, to_unit, train_classifier)

TINY = ClassifierConfig(channels=(4, 8), convs_per_stage=(1, 2), feature_dim=8)


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory, mnist_dir):
    """A tiny judge trained for a few steps on the synthetic digits: plumbing, not quality."""
    out = tmp_path_factory.mktemp("clf")
    train_classifier(mnist_dir, out, max_steps=3, batch_size=16, config=TINY, progress=False)
    return out


def _score(npz, mnist_dir, clf_dir, tmp_path, name="res.json") -> dict:
    main(["samples", str(npz), "--data-dir", str(mnist_dir), "--classifier", str(clf_dir), "--out", str(tmp_path / name),
          "--device", "cpu"])
    return json.loads((tmp_path / name).read_text())


# ------------------------------------------------------------------------------------------ good files
def test_real_test_digits_score_like_the_reference(mnist_dir, clf_dir, tmp_path):
    """The test split itself, saved as uint8: FLD ~ 0 and precision = recall = 1 (it *is* the reference)."""
    images, labels = load_mnist(mnist_dir, "test")
    np.savez(tmp_path / "real.npz", images=images.numpy(), labels=labels.numpy())
    res = _score(tmp_path / "real.npz", mnist_dir, clf_dir, tmp_path)
    m = res["metrics"]
    assert m["n"] == m["n_ref"] == 64 and m["fld"] == pytest.approx(0, abs=1e-4)
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert res["class_counts"] == torch.bincount(labels, minlength=10).tolist()
    # The floor is the real-data floor with the same class counts (what `evaluate ldm` prints at that N).
    from latentdiff.evaluate import load_or_train_classifier

    clf = load_or_train_classifier(clf_dir)
    floor = real_floor(clf, mnist_dir, reference_set(clf, mnist_dir), res["class_counts"], seed=0)
    assert res["floor"]["n"] == 64 and res["floor"]["fld"] == pytest.approx(floor["fld"])


def test_float_nchw_xy_file_matches_uint8_file(mnist_dir, clf_dir, tmp_path):
    """Keys x/y, float (N, 1, 28, 28) in [0, 1] and float labels: the same numbers as the uint8 file."""
    images, labels = synthetic_digits(40, seed=3)
    np.savez(tmp_path / "u8.npz", images=images, labels=labels)
    np.savez(tmp_path / "f.npz", x=(images / 255.0)[:, None].astype(np.float32), y=labels.astype(np.float32))
    a = _score(tmp_path / "u8.npz", mnist_dir, clf_dir, tmp_path, "a.json")
    b = _score(tmp_path / "f.npz", mnist_dir, clf_dir, tmp_path, "b.json")
    for key in ("accuracy", "fld", "fld_per_class_mean", "precision", "recall"):
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], abs=1e-5)
    # and the numbers are sample_metrics of the classifier's features, nothing else
    from latentdiff.evaluate import load_or_train_classifier

    clf = load_or_train_classifier(clf_dir)
    feats, logits = extract(clf, to_unit(torch.from_numpy(images)))
    direct = sample_metrics(feats, logits, torch.from_numpy(labels).long(), reference_set(clf, mnist_dir))
    assert a["metrics"]["fld"] == pytest.approx(direct["fld"]) and a["metrics"]["n"] == 40


def test_sample_py_npz_is_accepted_as_is(mnist_dir, clf_dir, tmp_path, monkeypatch):
    """What `sample.py --npz` writes scores without any conversion."""
    sys.path.insert(0, str(REPO))
    import sample

    tiny_pipeline().save_pretrained(tmp_path / "ldm")
    monkeypatch.setattr(sys, "argv", ["sample.py", "--model", str(tmp_path / "ldm"), "--per-label", "2", "--steps", "2",
                                      "--device", "cpu", "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz")])
    sample.main()
    res = _score(tmp_path / "s.npz", mnist_dir, clf_dir, tmp_path)
    assert res["metrics"]["n"] == 20 and res["class_counts"] == [2] * 10 and res["floor"]["n"] == 20


# ------------------------------------------------------------------------------------------ bad files
def _save(**arrays):
    return lambda p: np.savez(p, **arrays)


IM, LB = synthetic_digits(20)  # two of each class
ONE_THREE = LB.copy()
ONE_THREE[np.flatnonzero(LB == 3)[0]] = 4
BAD = {
    "missing": (lambda p: None, "not found"),
    "folder": (lambda p: p.mkdir(), "is a folder"),
    "text": (lambda p: p.write_text("images,labels\n"), "not an .npz archive"),
    "npy": (lambda p: np.save(open(p, "wb"), IM), "a single .npy array"),
    "keys": (_save(imgs=IM, lbls=LB), "has keys ['imgs', 'lbls']; it needs 'images' and 'labels'"),
    "pickled": (_save(images=np.array([IM], dtype=object), labels=LB), "cannot read"),
    "shape": (_save(images=np.zeros((20, 32, 32), np.uint8), labels=LB), "expected (N, 28, 28) or (N, 1, 28, 28)"),
    "channels_last": (_save(images=IM[..., None], labels=LB), "images[..., 0]"),
    "one_hot": (_save(images=IM, labels=np.eye(10)[LB]), "one-hot labels"),
    "count": (_save(images=IM, labels=LB[:19]), "20 images but 19 labels"),
    "label_range": (_save(images=IM, labels=np.where(LB == 3, 10, LB)), "label 10 in 'labels' is out of range; valid classes are 0..9"),
    "label_negative": (_save(images=IM, labels=LB.astype(int) - 1), "label -1"),
    "label_float": (_save(images=IM, labels=LB + 0.5), "must be integer class indices"),
    "minus_one_one": (_save(images=IM / 127.5 - 1, labels=LB), "(x + 1) / 2"),
    "zero_255": (_save(images=IM.astype(np.float32), labels=LB), "divide 0..255 images by 255"),
    "nan": (_save(images=np.where(IM > 250, np.nan, IM / 255.0), labels=LB), "NaN or infinite"),
    "int_images": (_save(images=IM.astype(np.int64), labels=LB), "dtype int64; save uint8"),
    "too_few": (_save(images=IM[:10], labels=LB[:10]), "holds 10 samples; the metrics need at least 20"),
    "thin_class": (_save(images=IM, labels=ONE_THREE), "class 3 has 1 sample; every class present needs at least 2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_get_one_clear_error(case, tmp_path):
    make, words = BAD[case]
    path = tmp_path / f"{case}.npz"
    make(path)
    with pytest.raises(DataError) as e:
        load_samples(path)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_file_one_line_exit_2_before_any_classifier(tmp_path):
    """Through `python -m latentdiff.evaluate`: one line on stderr, exit 2, and no classifier trained."""
    np.savez(tmp_path / "bad.npz", images=IM, labels=LB[:5])
    proc = run_cmd([BIN / "python", "-m", "latentdiff.evaluate", "samples", tmp_path / "bad.npz", "--classifier", tmp_path / "clf"],
                   check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines == [f"error: {tmp_path / 'bad.npz'}: 20 images but 5 labels; save one label per image"]
    assert not (tmp_path / "clf").exists()

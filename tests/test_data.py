"""MNIST loading from IDX files (gz or plain, flat or torchvision layout), its errors, and batching."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from conftest import N_TEST, N_TRAIN, synthetic_digits, write_idx, write_mnist

from latentdiff import DataError
from latentdiff.data import batch_indices, load_idx_folder, load_mnist, read_idx, to_model_range


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("layout", ["raw", "flat"])
def test_reads_idx_in_both_layouts(tmp_path, gz, layout):
    write_mnist(tmp_path, n_train=40, n_test=20, gz=gz, layout=layout)
    images, labels = load_mnist(tmp_path, "train")
    ref_images, ref_labels = synthetic_digits(40, seed=0)
    assert images.dtype == torch.uint8 and images.shape == (40, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (40,)
    assert torch.equal(images, torch.from_numpy(ref_images))
    assert torch.equal(labels, torch.from_numpy(ref_labels.astype(np.int64)))
    test_images, test_labels = load_mnist(tmp_path, "test")
    assert test_images.shape == (20, 28, 28) and test_labels.shape == (20,)


def test_fixture_folder(mnist_dir):
    images, labels = load_mnist(mnist_dir)
    assert images.shape == (N_TRAIN, 28, 28)
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert load_mnist(mnist_dir, "test")[0].shape == (N_TEST, 28, 28)


def test_env_var_is_honoured(mnist_dir, monkeypatch):
    monkeypatch.setenv("LATENTDIFF_DATA", str(mnist_dir))
    images, _ = load_mnist(None, "train", download=False)
    assert images.shape == (N_TRAIN, 28, 28)


def test_explicit_root_beats_env_var(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setenv("LATENTDIFF_DATA", str(tmp_path / "missing"))
    assert load_mnist(mnist_dir)[0].shape == (N_TRAIN, 28, 28)


def test_no_root_and_no_download_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data here
    with pytest.raises(DataError, match="LATENTDIFF_DATA") as err:
        load_mnist(None, "train", download=False)
    assert "data.download=true" in str(err.value)


@pytest.mark.parametrize("make", [False, True], ids=["missing", "empty"])
def test_a_missing_or_empty_folder_is_downloaded_into(tmp_path, fake_download, make, capsys):
    """load_mnist("data") after `make demo` on a machine whose MNIST was elsewhere: downloaded into data/."""
    root = tmp_path / "data"
    if make:
        root.mkdir()
    images, _ = load_mnist(root, "test")
    assert images.shape == (N_TEST, 28, 28) and fake_download == [root]
    assert f"downloading it into {root / 'MNIST' / 'raw'}" in capsys.readouterr().err
    load_mnist(root, "train")  # there now: no second download
    assert fake_download == [root]


def test_no_root_downloads_into_dot_data(tmp_path, fake_download, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_mnist(None, "test")[0].shape == (N_TEST, 28, 28) and (tmp_path / "data" / "MNIST" / "raw").is_dir()


def test_missing_folder_without_download_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="not found in .*nope.*data.download=true"):
        load_mnist(tmp_path / "nope", download=False)


def test_bad_split(mnist_dir):
    with pytest.raises(ValueError):
        load_mnist(mnist_dir, "validation")


@pytest.mark.parametrize("which", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"])
def test_missing_file_names_the_file(tmp_path, which):
    write_mnist(tmp_path, 20, 10)
    (tmp_path / "MNIST" / "raw" / f"{which}.gz").unlink()
    with pytest.raises(DataError, match=which):
        load_mnist(tmp_path)
    load_mnist(tmp_path, "test")  # the other split is unaffected


def test_bad_magic_names_the_file(tmp_path):
    write_mnist(tmp_path, 20, 10, gz=False, layout="flat")
    path = tmp_path / "train-images-idx3-ubyte"
    images, _ = synthetic_digits(20)
    write_idx(path, images, 2051)
    raw = bytearray(path.read_bytes())
    raw[2] = 9  # magic 2051 -> something else
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="magic") as e:
        load_mnist(tmp_path)
    assert str(path) in str(e.value)


def test_labels_file_given_as_images(tmp_path):
    write_mnist(tmp_path, 20, 10, gz=False, layout="flat")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "train-labels-idx1-ubyte", 2051)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_truncated_file_names_the_file(tmp_path, gz):
    write_mnist(tmp_path, 20, 10, gz=gz, layout="flat")
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as e:
        load_mnist(tmp_path)
    assert str(path) in str(e.value)


def test_truncated_payload_of_valid_gzip(tmp_path):
    """A complete gzip stream whose content is short: caught by the size check, not by gzip."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    images, _ = synthetic_digits(5)
    path.write_bytes(gzip.compress(write_idx(tmp_path / "x", images, 2051).read_bytes()[:-10], mtime=0))
    with pytest.raises(DataError, match="truncated"):
        read_idx(path, 2051)


def test_tiny_file(tmp_path):
    path = tmp_path / "t"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="too short"):
        read_idx(path, 2051)


def test_count_mismatch_names_both_files(tmp_path):
    write_mnist(tmp_path, 20, 10, gz=False, layout="flat")
    _, labels = synthetic_digits(19)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, 2049)
    with pytest.raises(DataError, match="20 images but .* 19 labels") as e:
        load_mnist(tmp_path)
    assert "train-images-idx3-ubyte" in str(e.value) and "train-labels-idx1-ubyte" in str(e.value)


def test_label_out_of_range(tmp_path):
    write_mnist(tmp_path, 20, 10, gz=False, layout="flat")
    _, labels = synthetic_digits(20)
    labels[3] = 42
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, 2049)
    with pytest.raises(DataError, match="42"):
        load_idx_folder(tmp_path)


def test_to_model_range():
    x = torch.tensor([[[0, 255], [128, 127]]], dtype=torch.uint8)
    y = to_model_range(x)
    assert y.shape == (1, 1, 2, 2) and y.dtype == torch.float32
    assert y.min() == -1 and y.max() == 1


# ---------------------------------------------------------------------------------------------- batching
def test_batch_indices_is_pure():
    a = batch_indices(100, 16, step=7, seed=3)
    b = batch_indices(100, 16, step=7, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, batch_indices(100, 16, step=7, seed=4))
    assert not torch.equal(a, batch_indices(100, 16, step=8, seed=3))
    # Out-of-order calls give the same answers (no hidden state).
    seq = [batch_indices(100, 16, s, 3) for s in range(20)]
    rev = [batch_indices(100, 16, s, 3) for s in reversed(range(20))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(seq, rev))


@pytest.mark.parametrize("n, bs", [(100, 10), (100, 16), (37, 5)])
def test_batch_indices_cover_each_example_once_per_epoch(n, bs):
    per_epoch = n // bs
    for epoch in range(3):
        idx = torch.cat([batch_indices(n, bs, epoch * per_epoch + k, seed=0) for k in range(per_epoch)])
        assert idx.shape == (per_epoch * bs,) and idx.dtype == torch.int64
        assert len(set(idx.tolist())) == per_epoch * bs  # no repeats within an epoch
        assert idx.min() >= 0 and idx.max() < n
        if bs * per_epoch == n:
            assert sorted(idx.tolist()) == list(range(n))
    # Epochs are reshuffled.
    e0 = torch.cat([batch_indices(n, bs, k, 0) for k in range(per_epoch)])
    e1 = torch.cat([batch_indices(n, bs, per_epoch + k, 0) for k in range(per_epoch)])
    assert not torch.equal(e0, e1)


def test_batch_larger_than_dataset():
    with pytest.raises(DataError, match="batch"):
        batch_indices(10, 11, 0, 0)


def test_failed_download_is_one_line_data_error(monkeypatch, tmp_path):
    """Without a data folder torchvision downloads; a network failure becomes a one-line DataError."""
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example/, got:\nno network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_mnist(None, "train", download=True)
    assert "\n" not in str(err.value) and "--data-dir" in str(err.value) and "no network" in str(err.value)
    assert "into data/MNIST/raw," in str(err.value) and "t10k-labels-idx1-ubyte.gz" in str(err.value)

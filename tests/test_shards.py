"""Sharded sampling (sample.py --out-dir): the split over processes, resume after a kill, the loader (issue 19)."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import latentdiff.serialization as serialization
from latentdiff import shards
from latentdiff.checkpoint import DiskFullError
from latentdiff.errors import RunDirError

from conftest import BIN, REPO, kill_when, run_cmd, tiny_pipeline

SETTINGS = {"steps": 2}


def job(pipe, n=21, shard_size=8, **kw) -> shards.Job:
    settings = json.loads(json.dumps(pipe.settings(**SETTINGS).to_kwargs()))
    return shards.Job(model="tiny", labels=kw.pop("labels", [3, 1, 4]), num_digits=n, seed=kw.pop("seed", 5),
                      shard_size=shard_size, settings=settings, tile_size=kw.pop("tile_size", pipe.tile_size))


def run_all(pipe, j, out, world=1, batch_size=3):
    shards.check_job(out, j)
    shards.start_job(out, j)
    made = kept = 0
    for rank in range(world):
        m, k = shards.run_shards(pipe, j, out, rank, world, batch_size)
        made, kept = made + m, kept + k
    shards.write_index(out, j)
    return made, kept


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.exactness
def test_digit_i_is_label_i_mod_L_and_seed_plus_i(tmp_path):
    pipe = tiny_pipeline()
    j = job(pipe)
    assert run_all(pipe, j, tmp_path) == (21, 0)
    images = torch.cat([load_file(str(tmp_path / s["file"]))["images"]
                        for s in json.loads((tmp_path / "index.json").read_text())["shards"]])
    labels = [[3, 1, 4][i % 3] for i in range(21)]
    expected = shards.to_uint8(pipe.generate(labels, seed=5, batch_size=3, **j.settings))
    assert torch.equal(images, expected)
    index = json.loads((tmp_path / "index.json").read_text())
    assert [(s["start"], s["count"]) for s in index["shards"]] == [(0, 8), (8, 8), (16, 5)]
    ds = shards.ShardDataset(tmp_path)  # the documented loader
    assert len(ds) == 21 and ds[17][1] == labels[17] and ds[17][0].shape == (1, 28, 28)
    assert torch.equal((ds[17][0][0] * 255).round().to(torch.uint8), expected[17])
    loader = torch.utils.data.DataLoader(ds, batch_size=10, shuffle=True, num_workers=0)
    assert sum(len(y) for _, y in loader) == 21
    with pytest.raises(IndexError):
        ds[21]


@pytest.mark.exactness
def test_any_process_count_gives_the_same_bytes_and_reruns_keep_verified_shards(tmp_path):
    pipe = tiny_pipeline()
    j = job(pipe)
    run_all(pipe, j, tmp_path / "one")
    run_all(pipe, j, tmp_path / "three", world=3, batch_size=5)  # batch size does not change the bytes either
    assert digest(tmp_path / "one") == digest(tmp_path / "three")
    # A rerun keeps checksummed shards, remakes a missing one and a corrupt one, and ends identical.
    (tmp_path / "one" / "shard-00001.safetensors").unlink()
    corrupt = tmp_path / "one" / "shard-00002.safetensors"
    corrupt.write_bytes(corrupt.read_bytes()[:-1] + b"\x01")  # same size: only the checksum sees it
    assert run_all(pipe, j, tmp_path / "one") == (13, 8)
    assert digest(tmp_path / "one") == digest(tmp_path / "three")


def test_a_folder_with_another_job_or_other_files_is_refused(tmp_path):
    pipe = tiny_pipeline()
    run_all(pipe, job(pipe), tmp_path / "a")
    with pytest.raises(RunDirError, match="seed was 5, now 6"):
        shards.check_job(tmp_path / "a", job(pipe, seed=6))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("x")
    with pytest.raises(RunDirError, match="not empty"):
        shards.check_job(tmp_path / "b", job(pipe))


def test_full_disk_while_writing_a_shard(tmp_path, monkeypatch):
    pipe = tiny_pipeline()
    j = job(pipe)
    real = serialization.save_file

    def full(tensors, path, metadata=None):
        if "shard-00001" in str(path):
            open(path, "wb").write(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(serialization, "save_file", full)
    with pytest.raises(DiskFullError, match=f"writing shard shard-00001.safetensors to {tmp_path}: it needs about"):
        run_all(pipe, j, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.json", "shard-00000.json", "shard-00000.safetensors"]


def test_a_script_destroys_its_process_group_however_it_ends():
    # A 2-process sample.py once aborted at exit (SIGABRT, gloo threads at interpreter teardown): run_main now
    # destroys the group a script started, after a clean end and after a refused input alike.
    import torch.distributed as dist

    from latentdiff.cli import run_main

    def refuse():
        raise ValueError("bad input")

    for body, code in ((lambda: None, None), (refuse, 2)):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            if code is None:
                run_main(body)
            else:
                with pytest.raises(SystemExit) as e:
                    run_main(body)
                assert e.value.code == code
            assert not dist.is_initialized()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


# ------------------------------------------------------------------------------------- the script, as users run it
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards") / "ldm"
    tiny_pipeline(tile_size=None).save_pretrained(folder)  # the device default: processes differ in thread count
    return folder


def sample_cmd(model_dir, out, nproc=1, launcher="torchrun"):
    args = [REPO / "sample.py", "--model", model_dir, "--out-dir", out, "--num-digits", "45", "--shard-size", "10",
            "--batch-size", "4", "--steps", "2", "--sampler", "ddpm", "--device", "cpu"]
    if nproc == 1:
        return [BIN / "python", *args]
    if launcher == "accelerate":  # accelerate's multi-process launcher is --multi_gpu, also on a CPU
        return [BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    return [BIN / "torchrun", "--standalone", "--nproc_per_node", str(nproc), *args]


@pytest.mark.slow
def test_torchrun_and_accelerate_two_processes_equal_one_and_a_killed_job_resumes(model_dir, tmp_path):
    # One process on 2 threads; 2 and 3 processes (one thread each), another batch size: the same bytes.
    one = run_cmd(sample_cmd(model_dir, tmp_path / "one"), env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"})
    assert "wrote 45 digits in 5 shards" in one.stdout and "digits/s" in one.stdout, one.stdout
    two = run_cmd(sample_cmd(model_dir, tmp_path / "two", nproc=2), env={"CUDA_VISIBLE_DEVICES": ""})
    assert "on 2 process(es)" in two.stdout, two.stdout + two.stderr
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    three = run_cmd([*sample_cmd(model_dir, tmp_path / "three", nproc=3), "--batch-size", "7"],
                    env={"CUDA_VISIBLE_DEVICES": ""})
    assert "on 3 process(es)" in three.stdout, three.stdout + three.stderr
    assert digest(tmp_path / "one") == digest(tmp_path / "three")
    acc = run_cmd(sample_cmd(model_dir, tmp_path / "acc", nproc=2, launcher="accelerate"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert "on 2 process(es)" in acc.stdout, acc.stdout + acc.stderr
    assert digest(tmp_path / "one") == digest(tmp_path / "acc")

    # A kill after shard 2's file is in place but before its sidecar leaves this: shards 0 and 1 are kept, 2 is made
    # again (and 3, 4). (A shard that fails its checksum: test_any_process_count_gives_the_same_bytes_and_reruns...)
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "one", killed)
    for name in ("index.json", "shard-00002.json", "shard-00003.safetensors", "shard-00003.json",
                 "shard-00004.safetensors", "shard-00004.json"):
        (killed / name).unlink()
    again = run_cmd(sample_cmd(model_dir, killed))
    assert "made 25" in again.stdout and "kept 20" in again.stdout, again.stdout
    assert digest(killed) == digest(tmp_path / "one")
    # SIGKILL from outside once shard 1 is finished: the kill lands wherever the job has got to; a rerun completes it.
    cut = tmp_path / "cut"
    proc = kill_when(sample_cmd(model_dir, cut), cut / "shard-00001.json", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode in (-9, 0), proc.stderr[-2000:]  # 0: it finished before the kill landed
    again = run_cmd(sample_cmd(model_dir, cut))
    kept = re.search(r"kept (\d+)", again.stdout)
    assert kept and int(kept[1]) >= 20, again.stdout  # shards 0 and 1 were finished before the kill
    assert digest(cut) == digest(tmp_path / "one")

    # Changing a setting that matters is refused with one line; the folder is untouched. The tile size is one.
    before = digest(tmp_path / "one")
    refused = run_cmd([*sample_cmd(model_dir, tmp_path / "one"), "--seed", "9"], check=False)
    assert refused.returncode == 2 and "seed was 0, now 9" in refused.stderr and "Traceback" not in refused.stderr
    refused = run_cmd([*sample_cmd(model_dir, tmp_path / "one"), "--tile-size", "8"], check=False)
    assert refused.returncode == 2 and "tile_size was 64, now 8" in refused.stderr, refused.stderr
    assert digest(tmp_path / "one") == before
    # A job started with another tile size resumes with the job's own when --tile-size is not given.
    run_cmd([*sample_cmd(model_dir, tmp_path / "tiled"), "--tile-size", "8"])
    for name in ("shard-00003.safetensors", "shard-00003.json", "index.json"):
        (tmp_path / "tiled" / name).unlink()
    resumed = run_cmd(sample_cmd(model_dir, tmp_path / "tiled"))
    assert "made 10" in resumed.stdout and "kept 35" in resumed.stdout, resumed.stdout


def test_small_jobs_still_write_the_grid_and_npz(model_dir, tmp_path):
    """--out / --npz are unchanged: grid rows per label, .npz in label-major order."""
    run_cmd([BIN / "python", REPO / "sample.py", "--model", model_dir, "--labels", "2", "7", "--per-label", "3",
             "--steps", "2", "--device", "cpu", "--out", tmp_path / "g.png", "--npz", tmp_path / "s.npz"])
    data = np.load(tmp_path / "s.npz")
    assert data["labels"].tolist() == [2, 2, 2, 7, 7, 7] and data["images"].shape == (6, 28, 28)
    bad = run_cmd([BIN / "python", REPO / "sample.py", "--model", model_dir, "--out-dir", tmp_path / "x", "--npz",
                   tmp_path / "y.npz"], check=False)
    assert bad.returncode == 2 and "one or the other" in bad.stderr


@pytest.mark.parametrize("args, word", [
    (["--num-digits", "0"], "--num-digits and --shard-size must be >= 1, got 0"),  # 0 used to mean the default (80)
    (["--out-dir", "afile"], "is a file, not a folder"),  # used to be a FileExistsError traceback
    (["--out-dir", "afile/x"], "lies under the file"),
])
def test_sharded_mode_bad_input_is_one_line(model_dir, tmp_path, args, word):
    (tmp_path / "afile").write_text("mine")
    base = ["--out-dir", "shards"] if "--out-dir" not in args else []
    proc = run_cmd([BIN / "python", REPO / "sample.py", "--model", model_dir, "--steps", "2", "--device", "cpu",
                    *base, *args], cwd=tmp_path, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and word in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "shards").exists() and (tmp_path / "afile").read_text() == "mine"


def test_a_corrupt_job_json_is_named(tmp_path):
    pipe = tiny_pipeline()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / shards.JOB_NAME).write_text('{"trunc')
    with pytest.raises(RunDirError, match=r"job.json is unreadable or corrupt .* choose a new --out-dir"):
        shards.check_job(tmp_path / "a", job(pipe))


def test_shard_dataset_names_what_a_bad_folder_is(tmp_path):
    """Each of these used to be a raw FileNotFoundError, JSONDecodeError, KeyError or SafetensorError."""
    from latentdiff.errors import DataError

    pipe = tiny_pipeline()
    j = job(pipe, n=12, shard_size=8)
    run_all(pipe, j, tmp_path / "done")
    assert len(shards.ShardDataset(tmp_path / "done")) == 12
    shutil.copytree(tmp_path / "done", tmp_path / "unfinished")
    (tmp_path / "unfinished" / shards.INDEX_NAME).unlink()
    shutil.copytree(tmp_path / "done", tmp_path / "bad_index")
    (tmp_path / "bad_index" / shards.INDEX_NAME).write_text("{")
    shutil.copytree(tmp_path / "done", tmp_path / "lost_shard")
    shards.shard_path(tmp_path / "lost_shard", 1).unlink()
    shutil.copytree(tmp_path / "done", tmp_path / "cut_shard")
    cut = shards.shard_path(tmp_path / "cut_shard", 0)
    cut.write_bytes(cut.read_bytes()[:100])
    (tmp_path / "other").mkdir()
    for folder, word in [("nope", "does not exist"), ("unfinished", "unfinished sampling job"),
                         ("other", "not a shard folder"), ("bad_index", "not a readable shard index"),
                         ("lost_shard", "shard-00001.safetensors is missing")]:
        with pytest.raises(DataError, match=word):
            shards.ShardDataset(tmp_path / folder)
    with pytest.raises(DataError, match="truncated or corrupt.*rerun the sample.py command"):
        shards.ShardDataset(tmp_path / "cut_shard")[0]

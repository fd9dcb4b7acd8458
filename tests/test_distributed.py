"""Two processes (torchrun, gloo on CPU) really share gradients, and split the global batch exactly.

Each run goes through the package's own train_vae / train_ldm (via tests/dist_helper.py, which only
adds a dump of every rank's final weights). What is shown:

* the two processes form one 2-process group (accelerate reports MULTI_CPU, world size 2);
* after N steps the two ranks hold bit-identical weights, though each saw only half of every batch;
* with a step that depends only on its batch, the 2-process run equals a 1-process run with the same
  global batch and seed (allclose 1e-5).

Why the VAE comparison uses switches in the helper:

1. Per-step randomness (VAE posterior noise; diffusion t, noise and label dropout) is keyed by each
   example's position in the global batch (train.example_seeds), so the same example gets the same
   draws under 1 and 2 processes (test_ldm_matches_one_process_run). --deterministic-vae (posterior
   mean, no sampling) is kept for the VAE tests so they isolate gradient sharing.
2. AdamW divides by sqrt(v) + 1e-8: a parameter whose true gradient is 0 receives about +-lr per
   step from rounding noise. The VAE has such parameters (conv biases right before a per-channel
   GroupNorm), so a different summation order (all-reduce of two half-batch means vs one full mean)
   shows up at the 1e-3 level after a few AdamW steps. --sgd makes the update linear in the gradient,
   so the comparison sees the gradients themselves.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BIN, REPO, as_set_args, run_cmd
from safetensors.torch import load_file

from latentdiff import VAE
from latentdiff.config import VAEConfig

pytestmark = pytest.mark.slow

HELPER = REPO / "tests" / "dist_helper.py"
STEPS = 4
COMMON = ["train.mixed_precision=null", f"train.steps={STEPS}", "train.batch_size=16", "train.warmup_steps=1", "train.log_every=2",
          "train.preview_every=0", "train.checkpoint_every=0", "train.seed=3", "data.download=false"]
VAE_ARGS = ["model.channels=[8,16,16]", "model.groups=8", "train.lr=0.1", "train.grad_clip=0"] + COMMON
LDM_ARGS = ["model.channels=[16,32]", "model.num_heads=2", "model.num_res_blocks=1", "diffusion.num_timesteps=100", "sample.guidance_interval=[10,80]",
            "sample.steps=2", "train.lr=1e-3", "train.ema_decay=0"] + COMMON


def _launch(nproc: int, stage: str, dump, out, data, extra_flags=(), overrides=(), vae=None):
    helper = [HELPER, "--stage", stage, "--dump", dump, *extra_flags, "--", "--out", out, "--data-dir", data,
              *(["--vae", vae] if vae else []), *as_set_args(list(overrides))]
    if nproc == 1:
        cmd = [BIN / "python", *helper]
    else:  # --standalone: a local rendezvous on a free port, so concurrent runs on one machine do not collide
        cmd = [BIN / "torchrun", "--standalone", "--nproc_per_node", str(nproc), *helper]
    run_cmd(cmd, timeout=300, env={"CUDA_VISIBLE_DEVICES": ""})  # CPU + gloo even on a GPU box (2 ranks, 1 GPU: no)
    infos = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(nproc)]
    weights = [load_file(str(dump / f"rank{r}.safetensors")) for r in range(nproc)]
    return infos, weights


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory, mnist_dir):
    root = tmp_path_factory.mktemp("dist_vae")
    flags = ["--deterministic-vae", "--sgd"]
    two = _launch(2, "vae", root / "dump2", root / "run2", mnist_dir, flags, VAE_ARGS)
    one = _launch(1, "vae", root / "dump1", root / "run1", mnist_dir, flags, VAE_ARGS)
    return {"two": two, "one": one, "root": root}


def test_two_processes_form_one_group(vae_runs):
    infos, _ = vae_runs["two"]
    assert sorted(i["rank"] for i in infos) == [0, 1]
    for info in infos:
        assert info["world"] == 2 and info["initialized"], info
        assert info["distributed_type"].endswith("MULTI_CPU") and info["backend"] == "gloo", info


def test_ranks_hold_identical_weights(vae_runs):
    _, (w0, w1) = vae_runs["two"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_two_processes_equal_one_process(vae_runs):
    _, (w0, _) = vae_runs["two"]
    _, (ref,) = vae_runs["one"]
    diff = _max_diff(w0, ref)
    assert diff < 1e-5, f"2-process weights differ from the 1-process run by {diff:.3g}"
    # The comparison means something: training moved the weights far more than the tolerance.
    torch.manual_seed(3)  # train.seed: the initial weights
    init = VAE(VAEConfig(channels=(8, 16, 16), groups=8)).state_dict()
    assert _max_diff(init, ref) > 1e-2


def test_only_the_main_process_writes_the_run(vae_runs):
    run = vae_runs["root"] / "run2"
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]
    assert [m["step"] for m in metrics] == [2, 4]  # one line per log step, not one per process
    assert (run / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def ldm_runs(tmp_path_factory, mnist_dir, vae_runs):
    root = tmp_path_factory.mktemp("dist_ldm")
    vae = vae_runs["root"] / "run1"
    two = _launch(2, "ldm", root / "dump2", root / "run2", mnist_dir, (), LDM_ARGS, vae=vae)
    one = _launch(1, "ldm", root / "dump1", root / "run1", mnist_dir, (), LDM_ARGS, vae=vae)
    return {"two": two, "one": one}


def test_ldm_ranks_identical_with_real_randomness(ldm_runs):
    """The real LDM step (AdamW, random t / noise / label dropout): ranks still agree exactly."""
    infos, (w0, w1) = ldm_runs["two"]
    assert all(i["world"] == 2 for i in infos)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_ldm_matches_one_process_run(ldm_runs):
    """Each example's t / noise / label dropout is keyed by its position in the global batch, not by the process."""
    _, (w0, _) = ldm_runs["two"]
    _, (ref,) = ldm_runs["one"]
    assert _max_diff(w0, ref) < 1e-5

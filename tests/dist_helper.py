"""Run train_vae / train_ldm exactly as the scripts do, then dump each process's weights.

Used by test_distributed.py under `torchrun --nproc_per_node N` (or plain python for one process):

    torchrun --nproc_per_node 2 tests/dist_helper.py --stage vae --dump DIR -- --out RUN --data-dir DATA --set ...

Every rank writes DIR/rank{r}.safetensors (its raw model weights after the last step) and
DIR/rank{r}.json (world size, backend, process index). ``--deterministic-vae`` makes the VAE's
posterior sample its mean, so a step depends only on the batch; ``--sgd`` swaps AdamW for SGD, whose
update is linear in the gradient (see test_distributed.py for why both).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import latentdiff.train as train
from latentdiff.cli import load_run_config, run_main, training_parser
from latentdiff.config import LDMRunConfig, VAERunConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", choices=["vae", "ldm"], required=True)
    p.add_argument("--dump", required=True)
    p.add_argument("--deterministic-vae", action="store_true")
    p.add_argument("--sgd", action="store_true", help="plain SGD instead of AdamW (see test_distributed.py)")
    own, rest = p.parse_known_args()
    rest = [a for a in rest if a != "--"]
    dump = Path(own.dump)
    torch.set_num_threads(1)

    if own.deterministic_vae:
        from latentdiff.vae import DiagonalGaussian

        DiagonalGaussian.sample = lambda self, generator=None, seeds=None: self.mean  # an autoencoder: no sampling noise

    if own.sgd:
        train.torch.optim.AdamW = lambda params, lr, weight_decay=0.0, fused=None: torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)

    original_loop = train.train_loop

    def loop_then_dump(cfg, accel, run_dir, task, resume):
        original_loop(cfg, accel, run_dir, task, resume)
        model = task.model
        dump.mkdir(parents=True, exist_ok=True)
        r = accel.process_index
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(dump / f"rank{r}.safetensors"))
        info = {"world": accel.num_processes, "rank": r, "distributed_type": str(accel.distributed_type),
                "backend": str(getattr(accel.state, "backend", None)),
                "initialized": torch.distributed.is_available() and torch.distributed.is_initialized()}
        (dump / f"rank{r}.json").write_text(json.dumps(info))

    train.train_loop = loop_then_dump
    if own.stage == "vae":
        args = training_parser("vae", "").parse_args(rest)
        train.train_vae(load_run_config(VAERunConfig, args, "vae"), overwrite=args.overwrite)
    else:
        parser = training_parser("ldm", "")
        parser.add_argument("--vae")
        args = parser.parse_args(rest)
        cfg = load_run_config(LDMRunConfig, args, "ldm", [f"vae_path={args.vae}"] if args.vae else [])
        train.train_ldm(cfg, overwrite=args.overwrite)


if __name__ == "__main__":
    run_main(main)  # as the scripts do: the process group is destroyed before exit

"""Train the VAE (stage 1).  accelerate launch train_vae.py --config quick --out runs/vae"""

from latentdiff.cli import load_run_config, run_main, training_parser
from latentdiff.config import VAERunConfig
from latentdiff.train import train_vae


def main() -> None:
    args = training_parser("vae", __doc__).parse_args()
    cfg = load_run_config(VAERunConfig, args, "vae")
    train_vae(cfg, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    run_main(main)

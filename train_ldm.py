"""Train the latent diffusion UNet (stage 2).  accelerate launch train_ldm.py --config quick --vae runs/vae --out runs/ldm"""

from latentdiff.cli import load_run_config, run_main, training_parser
from latentdiff.config import LDMRunConfig
from latentdiff.train import train_ldm


def main() -> None:
    parser = training_parser("ldm", __doc__)
    parser.add_argument("--vae", help="saved VAE folder from train_vae.py (overrides vae_path)")
    args = parser.parse_args()
    cfg = load_run_config(LDMRunConfig, args, "ldm", [f"vae_path={args.vae}"] if args.vae else [])
    train_ldm(cfg, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    run_main(main)

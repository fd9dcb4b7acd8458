"""Distil a trained LDM into a few-step student.  accelerate launch distill_ldm.py --teacher runs/ldm --out runs/ldm_fast --config quick"""

from latentdiff.cli import load_run_config, run_main, training_parser
from latentdiff.distill import DistillRunConfig, distill_ldm


def main() -> None:
    parser = training_parser("distill", __doc__)
    parser.add_argument("--teacher", help="finished LDM run folder from train_ldm.py (overrides teacher)")
    args = parser.parse_args()
    cfg = load_run_config(DistillRunConfig, args, "distill", [f"teacher={args.teacher}"] if args.teacher else [])
    distill_ldm(cfg, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    run_main(main)

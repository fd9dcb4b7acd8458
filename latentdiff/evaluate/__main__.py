"""``python -m latentdiff.evaluate ...``: the command line lives in commands.py (importable, testable)."""

from ..cli import run_main
from .commands import main

run_main(main)

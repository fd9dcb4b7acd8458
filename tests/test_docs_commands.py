"""Every shell command of the README (and of the guides named in PAGES, and edit.py's --help) runs as written.

Each ```bash / ```sh / ```console block runs with bash -e in a fresh folder laid out like a user's after
`make demo` on a machine whose MNIST lives elsewhere: the scripts of a checkout, runs/vae, runs/ldm and
runs/ldm_fast (tiny models), and no data/. Two stand-ins, because tests have no
network: $LATENTDIFF_DATA points at tiny MNIST IDX files (where a user's commands would download MNIST into
./data) and $LATENTDIFF_CLASSIFIER at a tiny judge (which `evaluate` would train once and cache). Blocks that
train into runs/vae or runs/ldm are what `make demo` itself runs: they start from a fresh clone (no runs/).
Sizes shrink by the substitutions in SHRINK, the only edits made to a command; commands that cannot run
here are in SKIP, each with its reason.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, REPO, write_mnist, write_user_folder

pytestmark = pytest.mark.slow
# The README, and the guides whose commands run in seconds on a tiny model. Not run: docs/editing.md's recipe for
# its figures (the same edit.py commands as edit.py's --help, which is run), distillation.md (minutes of distillation
# per command; tests/test_distill.py runs the script), results.md (dated records: the commands of their day),
# serving.md (a server and curl: tests/test_serve*.py), evaluation-and-benchmarks.md (placeholders for another
# generator's files, benchmark and H100 scripts; tests/test_evaluate*.py run the CLI), training.md (the README's
# training commands, and one variant by a --set: 30 s more for what tests/test_ema.py checks).
PAGES = ["README.md", "docs/sampling-and-guidance.md", "docs/scale.md"]
BLOCK = re.compile(r"^```(?:bash|sh|console)\n(.*?)^```", re.S | re.M)
# (pattern, replacement): sizes only. Training runs 2 steps; sampling and scoring a few digits per class.
SHRINK = [
    (r"\b(train_vae\.py|train_ldm\.py|distill_ldm\.py)\b", r"\1 --set train.steps=2"),
    (r"--per-label \d+", "--per-label 2"),
    (r"--n-per-class \d+", "--n-per-class 2"),
    (r"--num-digits \d+", "--num-digits 20"),
    (r"(--samplers(?: \S+:\d+)+)", "--samplers dpm++:2"),
    (r"--model runs/ldm --device cpu", "--model runs/ldm --device cpu --batches 4 --repeats 1"),
    (r"\bDIR\b", "$LATENTDIFF_DATA"),  # the guides' placeholder for a folder of MNIST IDX files
]
# (pattern, why it cannot run in a test). Keep this short.
SKIP = [
    (r"^make (demo|test|distill)\b", "the set-up itself: a virtual environment and minutes of training, or the whole "
                                     "suite; this test runs inside what it makes"),
    (r"^pip install", "needs the network"),
    (r"--multi_gpu --num_processes 8", "needs 8 GPUs"),
    (r"^torchrun ", "several processes: tests/test_shards.py runs the same launch"),
    (r"bench/(gpu_\w+\.sh|load_bench\.py)", "a benchmark session: a GPU, or minutes of load on a server"),
    (r"^python -m latentdiff\.serve\b", "a server that runs until stopped: tests/test_serve_browser.py starts it"),
]


def commands(text: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and console prompts dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ")
        if line and not line.startswith("#"):
            out.append(line)
    return out


def edit_help_commands() -> list[str]:
    """The examples in edit.py's --help (its module docstring)."""
    doc = ast.get_docstring(ast.parse((REPO / "edit.py").read_text()))
    return [ln.strip() for ln in doc.splitlines() if ln.strip().startswith("python edit.py")]


def blocks() -> list[tuple[str, list[str]]]:
    """(where, commands) of every block of PAGES, and edit.py's help as one block."""
    out = []
    for page in PAGES:
        text = (REPO / page).read_text()
        for m in BLOCK.finditer(text):
            out.append((f"{page}:{text.count(chr(10), 0, m.start()) + 1}", commands(m.group(1))))
    out.append(("edit.py --help", edit_help_commands()))
    seen, unique = set(), []
    for where, cmds in out:  # a block repeated on another page runs once
        key = tuple(re.sub(r"\s+#\s.*$", "", c) for c in cmds)  # the same commands, other comments
        if key not in seen:
            seen.add(key)
            unique.append((where, cmds))
    return unique


def shrink(cmd: str) -> str:
    for pattern, repl in SHRINK:
        cmd = re.sub(pattern, repl, cmd)
    return cmd


def skip_reason(cmd: str) -> str | None:
    return next((why for pattern, why in SKIP if re.search(pattern, cmd)), None)


def trains_make_demo_runs(cmds: list[str]) -> bool:
    return any(re.search(r"--out runs/(vae|ldm)(\s|$)", c) for c in cmds)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """$LATENTDIFF_DATA (tiny MNIST) and $LATENTDIFF_CLASSIFIER (a tiny judge, trained for 2 steps)."""
    from latentdiff.evaluate.classifier import ClassifierConfig, train_classifier

    root = tmp_path_factory.mktemp("stand_ins")
    data = write_mnist(root / "mnist")
    tiny = ClassifierConfig(channels=(4, 8), convs_per_stage=(1, 2), feature_dim=8)
    train_classifier(data, root / "classifier", max_steps=2, batch_size=8, config=tiny, progress=False)
    return {"LATENTDIFF_DATA": str(data), "LATENTDIFF_CLASSIFIER": str(root / "classifier")}


@pytest.fixture(scope="module")
def after_demo(tmp_path_factory) -> Path:
    """The runs/ of a user's folder after `make demo`, made once; each block gets a copy."""
    return write_user_folder(tmp_path_factory.mktemp("after_demo"), num_timesteps=1000)


def checkout(folder: Path) -> Path:
    """The scripts of a fresh clone (the package itself is the venv's editable install of this checkout)."""
    folder.mkdir(parents=True, exist_ok=True)
    for script in REPO.glob("*.py"):
        shutil.copy(script, folder)
    shutil.copytree(REPO / "bench", folder / "bench", ignore=shutil.ignore_patterns("results"))
    (folder / "bench" / "results").mkdir()
    (folder / "docs").mkdir()
    return folder


@pytest.mark.parametrize("where, cmds", blocks(), ids=[w for w, _ in blocks()])
def test_shell_block_runs(where, cmds, tmp_path, after_demo, stand_ins):
    runnable = [shrink(c) for c in cmds if skip_reason(c) is None]
    if not runnable:
        pytest.skip(f"nothing to run: {[skip_reason(c) for c in cmds]}")
    folder = checkout(tmp_path / "user")
    if not trains_make_demo_runs(cmds):
        shutil.copytree(after_demo / "runs", folder / "runs")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
    env.update(stand_ins, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1")
    script = "set -e -o pipefail\n" + "\n".join(runnable) + "\n"
    proc = subprocess.run(["bash", "-x", "-c", script], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (f"a command of {where} fails as a user would type it (after the SHRINK "
                                  f"substitutions):\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")


def test_commands_are_found_and_skips_stay_few():
    found = blocks()
    readme = [c for w, cmds in found if w.startswith("README.md") for c in cmds]
    assert any(c.startswith("python sample.py") for c in readme) and len(found) >= 9
    assert len(edit_help_commands()) == 8
    assert len(SKIP) <= 6, "skipping stays the exception: say why in SKIP, and keep it short"
    skipped_readme = [c for c in readme if skip_reason(c)]
    assert all(c.startswith("make ") for c in skipped_readme), skipped_readme


def test_extractor_joins_continuations_and_drops_comments():
    assert commands("# a comment\npython a.py --x 1 \\\n    --y 2   # trailing\n$ ls\n") == [
        "python a.py --x 1 --y 2   # trailing", "ls"]
    assert shrink("accelerate launch train_ldm.py --per-label 8 --data-dir DIR") == \
        "accelerate launch train_ldm.py --set train.steps=2 --per-label 2 --data-dir $LATENTDIFF_DATA"
    assert skip_reason("make demo   # creates .venv") and skip_reason("python sample.py") is None

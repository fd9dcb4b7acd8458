"""Every ```python block of the README and of docs/*.md runs, so the docs cannot rot.

The blocks of one page run in order in one namespace (as a reader would paste them), in a temporary
folder laid out like a user's after `make demo`: runs/vae, runs/ldm (a tiny model), runs/ldm_fast, and no
MNIST in data/: `load_mnist` downloads it there, from a stand-in for torchvision's download (no network). A block that is not meant to run is preceded by `<!-- no-run: why -->`; keep those
rare, and say why.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_user_folder

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NO_RUN = re.compile(r"<!--\s*no-run:\s*(\S.*?)-->\s*$")
MAX_NO_RUN = 3  # a budget, so skipping stays the exception


def snippets(page: Path) -> list[tuple[int, str, str | None]]:
    """(line number, code, the no-run reason or None) of every ```python block on the page."""
    text = page.read_text()
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NO_RUN.search(before)
        out.append((line, m.group(1), reason.group(1).strip() if reason else None))
    return out


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """A folder like a user's after `make demo` on a machine whose MNIST lives elsewhere: runs/ (tiny models), no data/
    (what `load_mnist("data", ...)` downloads comes from ``fake_download``), data/mnist_synth (scale.md's shards)."""
    return write_user_folder(tmp_path_factory.mktemp("reader"))


@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p)], ids=lambda p: str(p.relative_to(REPO)))
def test_python_snippets_run(page, user_folder, monkeypatch, fake_download):
    blocks = [(line, code) for line, code, reason in snippets(page) if reason is None]
    monkeypatch.chdir(user_folder)
    namespace: dict = {"__name__": "__docs__"}
    grad = torch.is_grad_enabled()
    try:
        for line, code in blocks:
            try:
                exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
            except Exception as e:  # name the page and line: the test id alone does not say which block broke
                raise AssertionError(f"the Python snippet at {page.relative_to(REPO)}:{line} fails: "
                                     f"{type(e).__name__}: {e}") from e
    finally:
        torch.set_grad_enabled(grad)  # a page may turn gradients off, as a script would; the next test expects them


def test_snippets_are_found_and_skips_are_rare():
    found = {p.name: snippets(p) for p in PAGES}
    assert found["README.md"], "the README should show the Python API"
    assert sum(map(len, found.values())) >= 6, found.keys()
    skipped = [(name, line, reason) for name, blocks in found.items() for line, _, reason in blocks if reason]
    assert len(skipped) <= MAX_NO_RUN, f"too many <!-- no-run --> blocks: {skipped}"


def test_extractor_reads_blocks_and_markers(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\n<!-- no-run: needs a GPU -->\n```python\ny = 2\n```\n"
                    "```bash\nls\n```\n")
    assert snippets(page) == [(3, "x = 1\n", None), (8, "y = 2\n", "needs a GPU")]

"""The sampling and training maths give the numbers recorded in tests/golden/ (see tests/golden.py).

Bit for bit on a machine of the recording's kind (torch version, CPU kernel set and features); to a tolerance
elsewhere, where the CPU's kernels round differently.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from golden import GOLDEN_FILE, MACHINE_FILE, golden_outputs, machine

pytestmark = pytest.mark.exactness


@pytest.fixture(scope="module")
def outputs() -> dict[str, torch.Tensor]:
    return golden_outputs()


def test_golden_outputs_cover_every_recorded_name(outputs):
    assert sorted(outputs) == sorted(load_file(str(GOLDEN_FILE)))


def test_golden_outputs_match(outputs):
    want = load_file(str(GOLDEN_FILE))
    exact = json.loads(MACHINE_FILE.read_text()) == machine()
    bad = []
    for name, ref in want.items():
        got = outputs[name]
        if exact and not torch.equal(got, ref):
            bad.append(f"{name}: max |diff| {(got.double() - ref.double()).abs().max().item():.3g} (want bit-identical)")
        elif not exact and not torch.allclose(got.double(), ref.double(), rtol=2e-4, atol=2e-4):
            bad.append(f"{name}: max |diff| {(got.double() - ref.double()).abs().max().item():.3g} (tolerance 2e-4)")
    assert not bad, "\n".join(bad)

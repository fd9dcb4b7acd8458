"""Golden outputs of the sampling and training maths: every sampler and spacing, CFG, the guidance interval,
autoguidance, both kinds of distilled student, every editing function and the three training losses (with a
gradient), all on tiny seeded models, one thread, tiles of 4 rows.

Recorded before the refactor of issue 33 ("the heart in one place") and checked after it: on a machine of the
recording's kind (same torch, same CPU kernel set and features) every value is bit-identical; elsewhere the
check is to a tolerance, since other CPUs round differently (docs/scale.md). Run
``python tests/golden.py`` to record (only when a change of the numbers is intended and explained).
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import perturb_, tiny_pipeline, tiny_unet  # noqa: E402

from latentdiff import LatentDiffusion  # noqa: E402
from latentdiff import edit  # noqa: E402
from latentdiff.config import DiffusionConfig  # noqa: E402
from latentdiff.diffusion import diffusion_loss  # noqa: E402
from latentdiff.distill import DistillConfig, lcd_loss, make_student, solver_grid  # noqa: E402
from latentdiff.progressive import progressive_loss, stage_grids  # noqa: E402

GOLDEN_FILE = HERE / "golden" / "heart.safetensors"
MACHINE_FILE = HERE / "golden" / "heart.json"
LABELS = [0, 3, 7, 9, 1]
SEED = 11


def machine() -> dict:
    """What decides the bits: torch, the ATen kernel set, and the CPU features oneDNN picks its kernels by."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    keep = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "cpu_flags": keep}


def _student(kind_seed: int) -> LatentDiffusion:
    """A tiny distilled-student pipeline: the teacher's UNet plus a perturbed guidance input."""
    teacher = tiny_pipeline()
    student = perturb_(make_student(teacher.unet, guidance_embed_scale=10.0), kind_seed, scale=0.05).eval()
    return LatentDiffusion(student, teacher.vae, teacher.config)


@torch.no_grad()
def sampling_outputs() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    pipe = tiny_pipeline()
    gen = lambda p, **kw: p.generate(LABELS, seed=SEED, **kw)  # noqa: E731
    for sampler, extra in [("ddpm", {}), ("ddim", {}), ("ddim", {"eta": 0.7}), ("dpm++", {})]:
        name = f"sampler/{sampler}" + ("_eta0.7" if extra else "")
        out[name] = gen(pipe, sampler=sampler, steps=5, guidance_scale=2.5, **extra)
    for spacing in ("uniform", "trailing", "logsnr", "karras"):
        out[f"spacing/{spacing}"] = gen(pipe, sampler="dpm++", steps=6, spacing=spacing, guidance_scale=2.0)
        out[f"spacing_ddim/{spacing}"] = gen(pipe, sampler="ddim", steps=3, spacing=spacing, guidance_scale=2.0)
    for scale in (0.0, 1.0, 3.0):
        out[f"cfg/{scale}"] = gen(pipe, sampler="ddim", steps=4, guidance_scale=scale)
    out["interval/dpm++"] = gen(pipe, sampler="dpm++", steps=6, guidance_scale=3.0, guidance_interval=[20, 80])
    out["interval/ddpm"] = gen(pipe, sampler="ddpm", steps=6, guidance_scale=3.0, guidance_interval=[20, 80])
    guided = LatentDiffusion(pipe.unet, pipe.vae, pipe.config, guide=tiny_unet(5), tile_size=4)
    out["autoguidance/cfg2"] = gen(guided, sampler="dpm++", steps=4, guidance_scale=2.0, autoguidance_scale=1.5)
    out["autoguidance/cfg1"] = gen(guided, sampler="ddim", steps=4, guidance_scale=1.0, autoguidance_scale=2.0)
    out["autoguidance/interval"] = gen(guided, sampler="dpm++", steps=4, guidance_scale=2.0, autoguidance_scale=1.5,
                                       guidance_interval=[0, 50])
    eps = tiny_pipeline(prediction="eps")
    out["eps/dpm++"] = gen(eps, sampler="dpm++", steps=5, guidance_scale=2.0)
    out["eps/ddim"] = gen(eps, sampler="ddim", steps=5, guidance_scale=2.0, eta=0.3)
    student = _student(7)
    out["student/lcm2"] = gen(student, sampler="lcm", steps=2, spacing="trailing", guidance_scale=1.75)
    out["student/lcm4"] = gen(student, sampler="lcm", steps=4, spacing="trailing", guidance_scale=2.5)
    out["student/ddim2"] = gen(student, sampler="ddim", steps=2, spacing="trailing", guidance_scale=1.75)
    # editing, from digits the model made
    src = out["sampler/dpm++"]
    kw = dict(sampler="dpm++", steps=5, guidance_scale=2.0)
    out["edit/img2img0.6"] = edit.img2img(pipe, src, [8] * len(src), 0.6, seed=3, **kw)
    out["edit/img2img_ddpm"] = edit.img2img(pipe, src, 2, 0.8, seed=3, sampler="ddpm", steps=5, guidance_scale=2.0)
    out["edit/inpaint"] = edit.inpaint(pipe, src, edit.half_mask("left"), [5] * len(src), seed=4, **kw)
    out["edit/inpaint_ddim_eta"] = edit.inpaint(pipe, src, edit.half_mask("top"), 6, seed=4, sampler="ddim", steps=4,
                                                eta=0.5)
    out["edit/interp_seeds"] = edit.interpolate_seeds(pipe, 4, 1, 2, 3, sampler="ddpm", steps=4)
    out["edit/interp_classes"] = edit.interpolate_classes(pipe, 2, 5, 9, 3, **kw)
    traj = edit.trajectory(pipe, [1, 2], seed=5, **kw)
    out["edit/trajectory_x0"], out["edit/trajectory_latents"] = traj.x0, traj.latents
    out["edit/trajectory_times"] = traj.timesteps
    out["edit/encode"] = pipe.encode(src)
    return out


def training_outputs() -> dict[str, torch.Tensor]:
    """The three losses on seeded batches, and the gradient of each on the UNet's first and last layers."""
    out: dict[str, torch.Tensor] = {}
    pipe = tiny_pipeline()
    abar = pipe.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 7, 7, generator=g)
    y = torch.tensor([0, 1, 2, 3, 10, 5])
    seeds = torch.arange(6, dtype=torch.int64) + 100

    def grads(name: str, model: torch.nn.Module, loss: torch.Tensor) -> None:
        model.zero_grad()
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        out[f"{name}/loss"] = loss.detach()
        out[f"{name}/grad_first"], out[f"{name}/grad_last"] = params[0].grad.clone(), params[-1].grad.clone()

    unet = tiny_unet(0).train()
    for label, kw in [("v", {}), ("v_min_snr", {"loss_weighting": "min_snr"})]:
        grads(f"loss/{label}", unet, diffusion_loss(unet, x0, y, abar.float(), DiffusionConfig(**kw), seeds=seeds))
    grads("loss/eps", unet, diffusion_loss(unet, x0, y, abar.float(), DiffusionConfig(prediction="eps"), seeds=seeds))

    teacher = tiny_unet(0).eval().requires_grad_(False)
    student = perturb_(make_student(teacher, 10.0), 7).train()
    target = perturb_(make_student(teacher, 10.0), 8).eval().requires_grad_(False)
    dc = DistillConfig(solver_steps=10)
    grid = solver_grid(abar, dc.solver_steps)
    loss, _ = lcd_loss(student, target, teacher, x0, y.clamp(max=9), seeds, abar.float(), grid, dc, "v", 10)
    grads("lcd/mse", student, loss)
    loss, _ = lcd_loss(student, target, teacher, x0, y.clamp(max=9), seeds, abar.float(), grid,
                       replace(dc, huber_c=0.01), "v", 10)
    grads("lcd/huber", student, loss)
    for stage, guided_teacher in [(1, teacher), (2, target)]:
        grids = stage_grids(abar, 8, stage)
        loss, _ = progressive_loss(student, guided_teacher, stage == 1, x0, y.clamp(max=9), seeds, abar.float(), grids,
                                   (1.0, 3.0), "v", 10)
        grads(f"progressive/stage{stage}", student, loss)
    return out


def golden_outputs() -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # at tiles of 4 rows the thread count is an input (docs/scale.md)
    try:
        return {**sampling_outputs(), **training_outputs()}
    finally:
        torch.set_num_threads(threads)


def record() -> None:
    from safetensors.torch import save_file

    outputs = golden_outputs()
    GOLDEN_FILE.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in outputs.items()}, str(GOLDEN_FILE))
    MACHINE_FILE.write_text(json.dumps(machine(), indent=2) + "\n")
    print(f"recorded {len(outputs)} golden outputs to {GOLDEN_FILE} on {machine()}")


if __name__ == "__main__":
    record()

"""A run folder to ONNX: one guided denoising step, the VAE's decoder and encoder, and a manifest.

``python -m latentdiff.export --model runs/ldm_fast --out exported/`` writes into ``exported/``:

- ``step.onnx``: one guided denoiser call, (x (B,C,h,w) f32, t (B,) i64, labels (B,) i64, scale (B,) f32)
  -> (x0, eps), each (B,C,h,w) f32. A teacher runs classifier-free guidance inside (one doubled batch); a
  distilled student takes the scale as its input. It is ``sampling.guided`` over ``sampling.Denoiser``, traced.
- ``step_cond.onnx`` (teachers only): the conditional denoiser alone, (x, t, labels) -> (x0, eps): what a
  teacher runs outside its guidance interval and at scales 1 and 0 (labels = the null label), as ``guided`` does.
- ``decode.onnx``: scaled latents (B,C,h,w) -> images (B,1,28,28) in [0, 1] (``LatentDiffusion.decode``).
- ``encode.onnx``: images in [0, 1] -> scaled latents, the posterior mean (``LatentDiffusion.encode``; editing).
- ``manifest.json``: what a runner needs besides the graphs (``MANIFEST_KEYS``): the schedule, the default
  settings and their timesteps, the latent shape, scale and shift, the classes, the prediction type, the
  noise's recipe, and the check below.

Every graph has a dynamic batch axis. After writing, each graph runs in ONNX Runtime on inputs of batch 1
and 3 and is compared with PyTorch; the largest difference (relative to the output's size) is written into
the manifest, and one over ``TOLERANCE`` fails the export. Sampling the graphs: ``latentdiff.onnx_runner``
(Python) and ``web/`` (the browser); docs/onnx.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from .config import SampleConfig
from .errors import LatentDiffError
from .pipeline import LatentDiffusion
from .sampling import Denoiser, guided
from .serialization import file_above
from .timesteps import make_timesteps

MANIFEST = "manifest.json"
FORMAT = "latentdiff-onnx/1"
OPSET = 17  # the TorchScript exporter's tested opset; GroupNorm becomes InstanceNormalization + affine
TOLERANCE = 1e-4  # largest |ORT - PyTorch| / max(1, max |PyTorch|) an export may show
CHECK_BATCHES = (1, 3)
REPO = Path(__file__).resolve().parent.parent
WEB_SOURCES = ("index.html", "latentdiff.js")
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")


class ExportError(LatentDiffError, ValueError):
    """What the export cannot do, with the fix."""


# ------------------------------------------------------------------------------------------ the graphs' modules
class GuidedStep(nn.Module):
    """(x, t, labels, scale) -> (x0, eps): ``guided(Denoiser(unet))`` at per-example scales (B,)."""

    def __init__(self, pipe: LatentDiffusion):
        super().__init__()
        self.unet, self.num_classes = pipe.unet, pipe.num_classes
        self.abar, self.prediction = pipe.alphas_cumprod, pipe.config.diffusion.prediction

    def forward(self, x, t, labels, scale):
        denoiser = Denoiser(self.unet, self.abar, self.prediction, self.unet.config.guidance_input)
        return guided(denoiser, labels, scale, self.num_classes)(x, t)


class CondStep(GuidedStep):
    """(x, t, labels) -> (x0, eps): the conditional denoiser alone (a teacher's unguided step)."""

    def forward(self, x, t, labels):
        return Denoiser(self.unet, self.abar, self.prediction)(x, t, labels)


class Decode(nn.Module):
    """Scaled latents -> images in [0, 1], as ``LatentDiffusion.decode``."""

    def __init__(self, pipe: LatentDiffusion):
        super().__init__()
        self.vae = pipe.vae

    def forward(self, latents):
        return ((self.vae._decode(self.vae.unscale_latents(latents)) + 1) / 2).clamp(0, 1)


class Encode(Decode):
    """Images in [0, 1] -> scaled latents (the posterior mean), as ``LatentDiffusion.encode``."""

    def forward(self, images):
        return self.vae.scale_latents(self.vae._encode(images * 2 - 1).mean)


def graph_specs(pipe: LatentDiffusion) -> dict[str, tuple[nn.Module, list[str], list[str]]]:
    """name -> (module, input names, output names) of the graphs this model exports."""
    specs = {"step": (GuidedStep(pipe), ["x", "t", "labels", "scale"], ["x0", "eps"])}
    if not pipe.unet.config.guidance_input:
        specs["step_cond"] = (CondStep(pipe), ["x", "t", "labels"], ["x0", "eps"])
    specs["decode"] = (Decode(pipe), ["latents"], ["images"])
    specs["encode"] = (Encode(pipe), ["images"], ["latents"])
    return specs


def example_inputs(pipe: LatentDiffusion, names: list[str], batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of ``batch`` rows for a graph's inputs ``names``: random latents, images, timesteps, labels, scales."""
    g = torch.Generator().manual_seed(seed)
    vc, T = pipe.vae.config, pipe.config.diffusion.num_timesteps
    image_shape = (batch, vc.in_channels, vc.image_size, vc.image_size)
    make = {"x": lambda: torch.randn(batch, *pipe.vae.latent_shape, generator=g),
            "latents": lambda: torch.randn(batch, *pipe.vae.latent_shape, generator=g),
            "t": lambda: torch.randint(0, T, (batch,), generator=g),
            "labels": lambda: torch.randint(0, pipe.num_classes + 1, (batch,), generator=g),
            "scale": lambda: torch.rand(batch, generator=g) * 4,
            "images": lambda: torch.rand(image_shape, generator=g)}
    return {n: make[n]() for n in names}


# ------------------------------------------------------------------------------------------ export
def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"the ONNX export needs onnx and onnxruntime ({e.name} is missing): "
                          "pip install -e '.[onnx]'") from None
    return onnxruntime


def export_graph(module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], path: Path) -> None:
    """torch.onnx.export of ``module`` with a dynamic batch axis on every input and output."""
    dynamic = {name: {0: "batch"} for name in [*inputs, *outputs]}
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes: nothing to act on
        warnings.simplefilter("ignore")
        try:
            # dynamo=False: the TorchScript exporter, which needs no onnxscript and exports these networks whole
            torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=list(inputs),
                              output_names=outputs, dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
        except Exception as e:  # noqa: BLE001 (the exporter raises many types; one line names the graph)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"torch.onnx.export could not export the {path.stem} graph ({first}); the model "
                              "uses an operation ONNX opset 17 lacks: export a model built from latentdiff's "
                              "own layers") from None


def session(path: Path, threads: int | None = None, optimization: str = "all"):
    """An ONNX Runtime CPU session for one graph: ``threads`` intra-op threads (None: one per core), graph
    optimisations ``optimization`` ("basic", "extended" or "all": with layout changes, the default)."""
    ort = _require_onnx()
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: the optimiser's notes are not the user's business
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_graph(module: nn.Module, path: Path, pipe: LatentDiffusion, names: list[str]) -> float:
    """Largest |ORT - PyTorch| / max(1, max |PyTorch|) over the outputs, at batches ``CHECK_BATCHES``."""
    sess, worst = session(path), 0.0
    for batch in CHECK_BATCHES:
        inputs = example_inputs(pipe, names, batch, seed=batch)
        want = module(*inputs.values())
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
        for w, o in zip(want if isinstance(want, tuple) else (want,), got):
            w = w.double()
            worst = max(worst, ((torch.from_numpy(o).double() - w).abs().max() / w.abs().max().clamp(min=1)).item())
    return worst


def manifest(pipe: LatentDiffusion, settings: SampleConfig, graphs: dict[str, str], differences: dict[str, float]) -> dict:
    """Everything a runner needs besides the graphs (the keys: docs/onnx.md); ``settings``: the defaults."""
    uc, vc, d = pipe.unet.config, pipe.vae.config, pipe.config.diffusion
    student = bool(uc.guidance_input)
    timesteps = make_timesteps(pipe.alphas_cumprod, settings.steps, settings.spacing)
    return {
        "format": FORMAT,
        "kind": "student" if student else "teacher",
        "graphs": graphs,
        "latent_shape": list(pipe.vae.latent_shape),
        "image_shape": [vc.in_channels, vc.image_size, vc.image_size],
        "num_classes": pipe.num_classes, "null_label": pipe.num_classes, "class_names": list(pipe.class_names),
        "prediction": d.prediction, "schedule": d.schedule, "num_timesteps": d.num_timesteps,
        "alphas_cumprod": pipe.alphas_cumprod.tolist(),  # float64, exact in JSON
        "sample": settings.to_kwargs(),
        "timesteps": timesteps.tolist(),
        "latent_scale": vc.scaling_factor, "latent_shift": vc.shift_factor,
        "guidance_embed_scale": uc.guidance_embed_scale if student else None,
        "noise": "latentdiff.noise.seeded_normal: SplitMix64 + Box-Muller in float64; digit i's start from seed i, "
                 "stream 0; step i of a stochastic sampler (lcm, ddpm, ddim eta > 0) from stream i + 1",
        "check": {"tolerance": TOLERANCE, "batches": list(CHECK_BATCHES), "max_rel_difference": differences,
                  "runtime": f"onnxruntime {_require_onnx().__version__}"},
    }


def export(model: str | Path, out: str | Path, **overrides) -> dict:
    """Export the run folder ``model`` into ``out`` (created); returns the manifest. ``overrides``: the
    default sampling settings written into the manifest (``LatentDiffusion.settings``' keywords)."""
    _require_onnx()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; pass a folder (it is created if missing)")
    above = file_above(out)
    if above is not None:
        raise ExportError(f"--out {out} lies under the file {above}, not a folder; choose another --out")
    pipe = LatentDiffusion.from_pretrained(model)
    settings = pipe.settings(**overrides)  # bad settings fail before the export's seconds
    if settings.autoguidance_scale != 1.0:
        raise ExportError(f"this model samples with autoguidance (autoguidance_scale={settings.autoguidance_scale:g}) "
                          "and the export has no guide network: pass --autoguidance-scale 1")
    out.mkdir(parents=True, exist_ok=True)
    graphs, differences = {}, {}
    with torch.no_grad():
        for name, (module, inputs, outputs) in graph_specs(pipe).items():
            path = out / f"{name}.onnx"
            export_graph(module.eval(), example_inputs(pipe, inputs, 2), outputs, path)
            differences[name] = check_graph(module, path, pipe, inputs)
            graphs[name] = path.name
    bad = {k: v for k, v in differences.items() if not v <= TOLERANCE}
    if bad:
        name, value = next(iter(bad.items()))
        raise ExportError(f"ONNX Runtime's {name} graph differs from PyTorch by {value:.2g} (> {TOLERANCE:g}); "
                          "the export is wrong: report it with the model's config.json")
    info = manifest(pipe, settings, graphs, differences)
    (out / MANIFEST).write_text(json.dumps(info, indent=1) + "\n")  # last: a folder with a manifest is whole
    return info


# ------------------------------------------------------------------------------------------ the browser page
def ort_web_dist() -> Path:
    """Where ``npm ci --prefix web`` puts onnxruntime-web's files (``make web`` runs it)."""
    return REPO / "web" / "node_modules" / "onnxruntime-web" / "dist"


def build_page(exported: str | Path, out: str | Path) -> Path:
    """The static page in ``out``: web/'s sources, onnxruntime-web vendored into ort/, the export in model/.

    ``exported``: a folder ``export`` wrote, of a distilled student. Returns ``out``.
    """
    exported, out = Path(exported), Path(out)
    info = json.loads((exported / MANIFEST).read_text())
    if info["kind"] != "student" or info["sample"]["sampler"] not in ("lcm", "ddim"):
        raise ExportError("the page samples distilled students (lcm or ddim, a few steps); export one "
                          "(distill_ldm.py writes it) instead of a teacher")
    dist = ort_web_dist()
    missing = [f for f in ORT_FILES if not (dist / f).is_file()]
    if missing:
        raise ExportError(f"onnxruntime-web is not installed ({missing[0]} missing in {dist}): run "
                          "`npm ci --prefix web` (make web does)")
    (out / "ort").mkdir(parents=True, exist_ok=True)
    for f in WEB_SOURCES:
        shutil.copy2(REPO / "web" / f, out / f)
    for f in ORT_FILES:
        shutil.copy2(dist / f, out / "ort" / f)
    if (out / "model").resolve() != exported.resolve():
        shutil.copytree(exported, out / "model", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("encode.onnx"))  # the page does not edit
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentdiff.export", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an LDM run folder (teacher or distilled student)")
    p.add_argument("--out", required=True, help="the folder to write the graphs and manifest.json into")
    p.add_argument("--page", action="store_true", help="also build the browser page around the export: "
                   "OUT/index.html, OUT/ort/ (onnxruntime-web, from `npm ci --prefix web`), OUT/model/")
    for flag, kind in (("--sampler", str), ("--steps", int), ("--guidance-scale", float), ("--spacing", str),
                       ("--autoguidance-scale", float)):
        p.add_argument(flag, type=kind, help="the manifest's default (default: the model's)")
    args = p.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("sampler", "steps", "guidance_scale", "spacing", "autoguidance_scale")}
    out = Path(args.out)
    info = export(args.model, out / "model" if args.page else out, **overrides)
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in info["check"]["max_rel_difference"].items())
    print(f"exported {info['kind']} {args.model} -> {out}; ONNX Runtime vs PyTorch, max relative difference: {diffs}")
    if args.page:
        build_page(out / "model", out)
        print(f"page: {out}/index.html (serve the folder with any static server, e.g. python -m http.server -d {out})")


if __name__ == "__main__":
    from .cli import run_main

    run_main(main)

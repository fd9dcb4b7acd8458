// Sampling an exported distilled student (python -m latentdiff.export) in the browser with onnxruntime-web.
//
// The same digits as Python for the same (model, class, seed, scale): the noise is latentdiff/noise.py's
// (SplitMix64 + Box-Muller in float64; BigInt for the 64-bit maths), the samplers are sampling.py's lcm and
// ddim (eta 0), with their coefficients in float64 and the tensor maths rounded to float32 after every
// operation (Math.fround), as PyTorch computes them. Only the networks' rounding differs (WebAssembly vs
// PyTorch's kernels, ~1e-6), which moves a pixel by less than a grey level (tests/test_web.py).
import * as ort from "./ort/ort.wasm.min.mjs";

const M64 = (1n << 64n) - 1n;
const GOLDEN = 0x9E3779B97F4A7C15n, MIX1 = 0xBF58476D1CE4E5B9n, MIX2 = 0x94D049BB133111EBn;
const f32 = Math.fround;

// SplitMix64's finaliser on unsigned 64-bit BigInts (noise.mix64).
function mix64(z) {
  z = ((z ^ (z >> 30n)) * MIX1) & M64;
  z = ((z ^ (z >> 27n)) * MIX2) & M64;
  return z ^ (z >> 31n);
}

// (B * n) standard normals as float32: row i from (seeds[i], stream) alone (noise.seeded_normal).
export function seededNormal(seeds, n, stream) {
  const out = new Float32Array(seeds.length * n);
  const u = new Float64Array(2 * n);
  seeds.forEach((seed, row) => {
    const key = mix64(BigInt.asUintN(64, BigInt(seed)) ^ 0x5DEECE66Dn);
    const first = BigInt(stream * 2 * n + 1);
    for (let k = 0; k < 2 * n; k++) {  // noise.uniform_bits: (top 53 bits + 0.5) / 2^53
      const z = mix64((key + (first + BigInt(k)) * GOLDEN) & M64);
      u[k] = (Number(z >> 11n) + 0.5) * 2 ** -53;
    }
    for (let k = 0; k < n; k++) {  // Box-Muller in float64, then float32
      out[row * n + k] = f32(Math.sqrt(-2.0 * Math.log(u[k])) * Math.cos(2.0 * Math.PI * u[n + k]));
    }
  });
  return out;
}

// sqrt(a) x0 + sqrt(v) eps, the coefficients rounded to float32 first (diffusion.renoise with sigma 0).
function renoise(x0, eps, abar) {
  const a = f32(Math.sqrt(abar)), s = f32(Math.sqrt(Math.max(1 - abar, 0)));
  return x0.map((v, k) => f32(f32(a * v) + f32(s * eps[k])));
}

// A consistency model's f(x, t) = c_skip x + c_out x0 (sampling.consistency_scalings: sigma_data 0.5, t * 10).
function consistencyX0(x0, x, t) {
  const st = t * 10.0;
  const cSkip = f32(0.25 / (st * st + 0.25)), cOut = f32(st / Math.sqrt(st * st + 0.25));
  return x0.map((v, k) => f32(f32(cSkip * x[k]) + f32(cOut * v)));
}

export class Student {
  // Load manifest.json and the student's step and decoder graphs from base (a folder URL ending in "/").
  static async load(base) {
    ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;  // this host's copy, never a CDN
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
    const manifest = await (await fetch(base + "manifest.json")).json();
    if (manifest.kind !== "student" || !["lcm", "ddim"].includes(manifest.sample.sampler)) {
      throw new Error("this page samples distilled students (lcm or ddim): export one with python -m latentdiff.export");
    }
    const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
    const [step, decode] = await Promise.all(
      ["step", "decode"].map((g) => ort.InferenceSession.create(base + manifest.graphs[g], options)));
    return new Student(manifest, step, decode);
  }

  constructor(manifest, step, decode) {
    Object.assign(this, { manifest, step, decode });
    this.n = manifest.latent_shape.reduce((a, b) => a * b);
  }

  // The guided denoiser at (x, t): { x0, eps }, each Float32Array(B * n).
  async denoise(x, t, labels, scale) {
    const B = labels.length, shape = [B, ...this.manifest.latent_shape];
    const out = await this.step.run({
      x: new ort.Tensor("float32", x, shape),
      t: new ort.Tensor("int64", new BigInt64Array(B).fill(BigInt(t)), [B]),
      labels: new ort.Tensor("int64", BigInt64Array.from(labels, BigInt), [B]),
      scale: new ort.Tensor("float32", new Float32Array(B).fill(scale), [B]),
    });
    return { x0: out.x0.data, eps: out.eps.data };
  }

  // Digits of `labels`, digit i from seed + i: Float32Array(B * 28 * 28) in [0, 1] (LatentDiffusion.generate).
  async generate(labels, seed, scale = this.manifest.sample.guidance_scale) {
    const seeds = labels.map((_, i) => seed + i);
    const ts = this.manifest.timesteps, abar = this.manifest.alphas_cumprod;
    let x = seededNormal(seeds, this.n, 0);
    for (let i = 0; i < ts.length; i++) {
      const { x0, eps } = await this.denoise(x, ts[i], labels, scale);
      const next = i + 1 < ts.length ? abar[ts[i + 1]] : 1.0;
      if (this.manifest.sample.sampler === "lcm") {  // sampling.lcm: f(x, t), then re-noise with stream i + 1
        x = consistencyX0(x0, x, ts[i]);
        if (i + 1 < ts.length) x = renoise(x, seededNormal(seeds, this.n, i + 1), next);
      } else {  // sampling.ddim, eta 0: renoise(x0, eps, abar of the next step)
        x = renoise(x0, eps, next);
      }
    }
    const images = await this.decode.run({ latents: new ort.Tensor("float32", x, [labels.length, ...this.manifest.latent_shape]) });
    return images.images.data;
  }
}

// Draw B digits (Float32Array of B * h * w in [0, 1]) into `canvas`, `cols` per row, one canvas pixel per image pixel.
export function drawGrid(canvas, images, count, [, h, w], cols) {
  const rows = Math.ceil(count / cols);
  canvas.width = cols * w;
  canvas.height = rows * h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(canvas.width, canvas.height);
  for (let d = 0; d < count; d++) {
    const ox = (d % cols) * w, oy = Math.floor(d / cols) * h;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const v = Math.round(f32(Math.min(Math.max(images[(d * h + y) * w + x], 0), 1) * 255));
        const p = ((oy + y) * canvas.width + ox + x) * 4;
        img.data[p] = img.data[p + 1] = img.data[p + 2] = v;
        img.data[p + 3] = 255;
      }
    }
  }
  ctx.putImageData(img, 0, 0);
}

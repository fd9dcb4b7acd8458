import torch, sys
from latentdiff import LatentDiffusion
pipe = LatentDiffusion.from_pretrained(sys.argv[1])
torch.manual_seed(0)
x = torch.randn(64, 4, 7, 7); y = torch.arange(64) % 10; t = torch.full((64,), 999)
ws = torch.arange(1.40, 1.6001, 0.0025)
with torch.no_grad():
    outs = torch.stack([pipe.unet(x, t, y, torch.full((64,), float(w))) for w in ws])  # (W, B, ...)
d = (outs[1:] - outs[:-1]).flatten(1).norm(dim=1)
print("step norms of output per 0.0025 of w (min / median / max):", d.min().item(), d.median().item(), d.max().item())
for i in range(0, len(ws) - 1, 4):
    print(f"w {ws[i]:.4f}: |d out| {d[i]:.4f}")
# features: embedding norm change
from latentdiff.nn import timestep_embedding
from latentdiff.unet import GUIDANCE_EMBED_SCALE
e = torch.stack([pipe.unet.guidance_embed(timestep_embedding(torch.tensor([float(w)]) * GUIDANCE_EMBED_SCALE, pipe.unet.config.channels[0]))[0] for w in ws])
de = (e[1:] - e[:-1]).norm(dim=1)
print("guidance embedding change per 0.0025 (min/median/max):", de.min().item(), de.median().item(), de.max().item(), "norm", e.norm(dim=1).mean().item())
print("path length / chord over [1.40, 1.60]:", (d.sum() / (outs[-1] - outs[0]).flatten().norm()).item())
teacher = LatentDiffusion.from_pretrained(sys.argv[2]).unet
with torch.no_grad():
    c = teacher(x, t, y); u = teacher(x, t, torch.full_like(y, 10))
print("teacher CFG: change per 0.0025 of g:", (0.0025 * (c - u)).flatten().norm().item(), " student chord per 0.0025:",
      ((outs[-1] - outs[0]).flatten().norm() / (len(ws) - 1)).item())

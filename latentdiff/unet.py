"""Class-conditioned UNet over the latent grid. Label index ``num_classes`` means "no label"."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .config import UNetConfig, VAEConfig
from .nn import Attention, Downsample, ResBlock, SiLU, Upsample, timestep_embedding
from .serialization import load_model, save_model



class UNet(nn.Module):
    """``unet(z_t, t, y)``: z_t (B,C,H,W), t (B,) timesteps, y (B,) labels in [0, num_classes] (or soft, see forward)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        default = VAEConfig()  # null latent shape: the default VAE's (train_ldm sets it from the actual VAE)
        self.config = config = replace(
            config, in_channels=default.latent_channels if config.in_channels is None else config.in_channels,
            sample_size=default.latent_size if config.sample_size is None else config.sample_size)
        ch, g, heads = config.channels, config.groups, config.num_heads
        emb_dim = 4 * ch[0]
        self.time_embed = nn.Sequential(nn.Linear(ch[0], emb_dim), SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(config.num_classes + 1, emb_dim)  # +1: the null label for CFG
        if config.guidance_input:  # the scale w, embedded like t; zero output at init, so a fresh student = its teacher
            self.guidance_embed = nn.Sequential(nn.Linear(ch[0], emb_dim), SiLU(), nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.guidance_embed[-1].weight)
            nn.init.zeros_(self.guidance_embed[-1].bias)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_dim, g, config.dropout)

        # Down path: every block's output is kept as a skip for the up path.
        self.down = nn.ModuleList()
        skip_ch = [ch[0]]
        prev = ch[0]
        for i, c in enumerate(ch):
            for _ in range(config.num_res_blocks):
                self.down.append(nn.ModuleList([res(prev, c)] + ([Attention(c, heads, g)] if config.attention_levels[i] else [])))
                prev = c
                skip_ch.append(c)
            if i < len(ch) - 1:
                self.down.append(nn.ModuleList([Downsample(c)]))
                skip_ch.append(c)
        self.mid = nn.ModuleList([res(prev, prev), Attention(prev, heads, g), res(prev, prev)])
        # Up path: num_res_blocks + 1 blocks per level, each eating one skip.
        self.up = nn.ModuleList()
        for i, c in reversed(list(enumerate(ch))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(nn.ModuleList([res(prev + skip_ch.pop(), c)] + ([Attention(c, heads, g)] if config.attention_levels[i] else [])))
                prev = c
            if i > 0:
                self.up.append(nn.ModuleList([Upsample(c)]))
        self.out = nn.Sequential(nn.GroupNorm(g, prev), SiLU(), nn.Conv2d(prev, config.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # predicts 0 at init
        nn.init.zeros_(self.out[-1].bias)
        # The low-rank factors merged into these weights over the base UNet they were taught on (with_lora), so a LoRA
        # adapter saves them instead of the weights: {module name: (A, B)}; None for any other UNet.
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        # w: (B,) guidance scales, for a guidance_input UNet (a distilled student) only.
        # y: (B,) labels, or (B, num_classes + 1) float weights blending the label embeddings (interpolation);
        # a weighted sum, not a matmul, so autocast keeps it fp32 and a one-hot row is exactly the lookup.
        if y.is_floating_point():
            label_emb = (y[:, :, None].to(self.class_embed.weight.dtype) * self.class_embed.weight).sum(1)  # (B, E)
        else:
            label_emb = self.class_embed(y)
        emb = self.time_embed(timestep_embedding(t, self.config.channels[0])) + label_emb  # (B, E)
        if self.config.guidance_input:
            if w is None:
                raise ValueError("this UNet is a distilled student: pass its guidance scale w (B,) as well")
            emb = emb + self.guidance_embed(timestep_embedding(w * self.config.guidance_embed_scale, self.config.channels[0]))
        elif w is not None:
            raise ValueError("this UNet does not take a guidance scale input; guide it with latentdiff.sampling.guided")
        h = self.conv_in(x)
        skips = [h]
        for blocks in self.down:
            for layer in blocks:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for blocks in self.up:
            if isinstance(blocks[0], Upsample):
                h = blocks[0](h, skips[-1].shape[-2:])  # undo odd-size rounding: 4 -> 7, not 8
                continue
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C_h + C_skip, H, W)
            for layer in blocks:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h)

    def with_classes(self, embeddings: torch.Tensor) -> "UNet":
        """This UNet with k more classes, num_classes .. num_classes + k - 1, whose label embeddings are the rows of
        ``embeddings`` (k, E); the null label moves to the new end. Every other weight is copied unchanged, so the
        old classes give the same outputs, bit for bit (a taught class: latentdiff.teach)."""
        weight = self.class_embed.weight.detach()
        if embeddings.ndim != 2 or embeddings.shape[1] != weight.shape[1]:
            raise ValueError(f"class embeddings must be (k, {weight.shape[1]}) for this UNet, got {tuple(embeddings.shape)}")
        grown = UNet(replace(self.config, num_classes=self.config.num_classes + embeddings.shape[0])).to(weight.device)
        state = self.state_dict()
        state["class_embed.weight"] = torch.cat([weight[:-1], embeddings.to(weight), weight[-1:]])
        grown.load_state_dict(state)
        return grown.train(self.training)

    def with_lora(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> "UNet":
        """A copy of this UNet with low-rank updates merged into its weights (LoRA, Hu et al. 2022), so it runs as a
        plain UNet: each named Linear or Conv2d's W becomes W + B @ A, for A (r, in) or (r, in, kh, kw) and B (out, r)
        with the LoRA scale folded in. The copy keeps ``factors`` as ``.lora`` (what a LoRA adapter saves)."""
        state, modules = self.state_dict(), dict(self.named_modules())
        for name, (a, b) in factors.items():
            w = state.get(f"{name}.weight")
            if not isinstance(modules.get(name), (nn.Linear, nn.Conv2d)) or a.ndim != w.ndim or b.ndim != 2 \
                    or a.shape[1:] != w.shape[1:] or b.shape != (w.shape[0], a.shape[0]):
                raise ValueError(f"LoRA factors {tuple(a.shape)} x {tuple(b.shape)} do not fit {name!r} of this UNet")
            a, b = a.to(w).flatten(1), b.to(w)  # (r, in * kh * kw), (out, r)
            # Summed one rank at a time from elementwise products, not by a matmul, whose blocking and FMA use vary
            # with the CPU kernel set and thread count: the same factors merge to the same bits on every machine.
            delta = b[:, :1] * a[:1]
            for j in range(1, a.shape[0]):
                delta = delta + b[:, j:j + 1] * a[j:j + 1]
            state[f"{name}.weight"] = w + delta.view_as(w)
        merged = UNet(self.config).to(next(iter(state.values())).device)
        merged.load_state_dict(state)
        merged.lora = dict(factors)
        return merged.train(self.training)

    def save_pretrained(self, directory: str | Path, state_dict: dict | None = None) -> None:
        """Write config.json + model.safetensors (``state_dict`` e.g. the EMA weights)."""
        save_model(self, self.config, directory, state_dict)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "UNet":
        return load_model(cls, UNetConfig, directory, device)


class TaughtUNet(nn.Module):
    """A base UNet and a fine-tuned copy of it that knows taught classes (latentdiff.teach), routed by label.

    Rows of a taught class run ``tuned``; every other row (the base's classes and the null label, so the
    unconditional half of guidance too) runs ``base``, so the base's classes sample bit for bit as the base
    does. Both networks see the same rows in the same call (the pipeline's fixed tiles), and a row's output
    does not depend on its batch-mates, so picking rows with ``torch.where`` keeps each row's bits. A call
    whose rows are all of one side runs that network alone; a mixed call (a taught class under guidance:
    the taught row and its null row) runs both.
    """

    def __init__(self, base: UNet, tuned: UNet):
        super().__init__()
        k, n = base.config.num_classes, tuned.config.num_classes
        if n <= k or replace(tuned.config, num_classes=k) != base.config:
            raise ValueError(f"tuned UNet ({tuned.config}) is not the base ({base.config}) with classes added")
        self.base, self.tuned = base, tuned
        self.config = tuned.config  # what the pipeline reads: num_classes (base + taught), guidance_input, ...

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        k, n = self.base.config.num_classes, self.config.num_classes
        extra = () if w is None else (w,)
        if y.is_floating_point():  # label-embedding weights (B, n + 1): the base's columns are its classes and null
            taught = y[:, k:n].abs().sum(1) > 0
            y_base = torch.cat([y[:, :k], y[:, n:]], 1)
        else:
            taught = (y >= k) & (y < n)
            y_base = torch.where(taught, 0, torch.where(y == n, k, y))  # null moves back to the base's index
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):  # eager: run only what the rows need
            if not bool(taught.any()):
                return self.base(x, t, y_base, *extra)
            if bool(taught.all()):
                return self.tuned(x, t, y, *extra)
        return torch.where(taught.view(-1, *([1] * (x.ndim - 1))), self.tuned(x, t, y, *extra),
                           self.base(x, t, y_base, *extra))

    def save_pretrained(self, directory: str | Path, state_dict: dict | None = None) -> None:
        raise ValueError("a model with taught classes saves as an adapter on its base (teach.py, latentdiff.teach."
                         "save_adapter), not as a model folder of its own")

"""Toy models with exact arithmetic: a denoiser returning ``2*x + e`` (e = +1 cond, -1 uncond),
a scheduler that either integrates with a binary-exact step or replays scripted latents, and a
pipeline running separate, batched or no CFG like the diffusers pipelines do."""

from __future__ import annotations

import dataclasses

import torch

from diffcache.adapter import Adapter

TOY = Adapter(
    name="toy",
    pipelines=("ToyPipeline",),
    denoisers=("ToyDenoiser",),
    cfg="separate",
    media="image",
    call_args={},
)


@dataclasses.dataclass
class ToyOutput:
    sample: torch.Tensor


class ToyDenoiser(torch.nn.Module):
    """``2*x + e``; counts real forward passes; optional NaN at a given call."""

    def __init__(self, nan_at_call: int | None = None) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.calls = 0
        self.nan_at_call = nan_at_call

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, return_dict=True):
        e = encoder_hidden_states if encoder_hidden_states is not None else 0.0
        if isinstance(e, torch.Tensor):
            e = e.view(-1, *([1] * (hidden_states.ndim - 1)))
        out = self.scale * hidden_states + e
        if self.nan_at_call is not None and self.calls == self.nan_at_call:
            out = out * float("nan")
        self.calls += 1
        return ToyOutput(out) if return_dict else (out,)


class ToyScheduler:
    """``x <- x - v/8`` (exact in binary), or replays ``script`` latents when given."""

    def __init__(self, script: list[torch.Tensor] | None = None) -> None:
        self.script = script
        self.timesteps = torch.tensor([])
        self.outputs: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self.timesteps = torch.arange(num_inference_steps, 0, -1, dtype=torch.float32) * 10
        self._i = 0
        self.outputs = []

    def step(self, model_output, timestep, sample, return_dict=True):
        self.outputs.append(model_output.clone())
        self._i += 1
        if self.script is not None:
            prev = self.script[min(self._i, len(self.script) - 1)].clone()
        else:
            prev = sample - model_output / 8
        return (prev,)


class ToyPipeline:
    """Runs a denoising loop the way diffusers pipelines do, with a chosen CFG style."""

    def __init__(self, cfg: str = "separate", script=None, nan_at_call=None) -> None:
        self.transformer = ToyDenoiser(nan_at_call)
        self.scheduler = ToyScheduler(script)
        self.cfg = cfg

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, steps: int = 6, guidance_scale: float = 2.0):
        self.scheduler.set_timesteps(steps)
        x = latents
        cfg_on = guidance_scale > 1 and self.cfg != "none"
        for t in self.scheduler.timesteps:
            if cfg_on and self.cfg == "separate":
                cond = self.transformer(
                    x, t, encoder_hidden_states=torch.tensor([1.0]), return_dict=False
                )[0]
                unc = self.transformer(
                    hidden_states=x, timestep=t, encoder_hidden_states=torch.tensor([-1.0])
                ).sample
                v = unc + guidance_scale * (cond - unc)
            elif cfg_on and self.cfg == "batched":
                both = self.transformer(
                    torch.cat([x, x]),
                    t.expand(2 * x.shape[0]),
                    torch.tensor([1.0, -1.0]).repeat_interleave(x.shape[0]),
                )
                cond, unc = both.sample.chunk(2)
                v = unc + guidance_scale * (cond - unc)
            else:
                v = self.transformer(x, t, torch.tensor([1.0])).sample
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        return x

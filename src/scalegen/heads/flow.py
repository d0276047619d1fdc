"""Flow-matching head (FlowAR): the per-scale flow network, its loss, and the float64 Euler ODE sampler.

Path x_t = (1 - t) x + t eps (t = 1 is noise), velocity target eps - x, t ~ U(0, 1) once per sample and scale,
scales weighted by token count (s_k^2 / s_K^2). Sampling starts every scale from pure noise and integrates
t: 1 -> 0 with classifier-free guidance inside an interval of t. Reference: FlowAR's models/flowloss.py, sampler.py and flowmodel.py:291-365.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import torch
import torch.nn as nn

from scalegen.generation.guidance import ScaleGuidance
from scalegen.generation.options import HeadOptions
from scalegen.heads.flownet import FlowNet, GridVelocity

TIME_GRIDS = ("flowar", "uniform")


def check_sampling(num_steps=None, guidance=None, time_grid=None, prefix: str = "") -> None:
    """Flow sampling options that cannot work, named by their key (`prefix`: where they were set, e.g. "head.")."""
    if num_steps is not None and (int(num_steps) != num_steps or num_steps < 1):
        raise ValueError(f"{prefix}num_steps={num_steps}: needs an integer >= 1 (FlowAR uses 25 or 50)")
    if guidance is not None and not 0.0 <= guidance <= 1.0:
        raise ValueError(f"{prefix}guidance={guidance}: the guidance interval's upper end, a time in [0, 1]")
    if time_grid is not None and time_grid not in TIME_GRIDS:
        raise ValueError(f"{prefix}time_grid={time_grid!r}: allowed values are {list(TIME_GRIDS)}")


@dataclass(frozen=True)
class FlowOptions(HeadOptions):
    """The flow head's sampling options (config keys of the same names); None: the head's own (head.num_steps, ...)."""

    num_steps: int | None = None  # Euler grid size (25 -> 24 steps, 50 -> uniform)
    guidance: float | None = None  # CFG only while t <= guidance (FlowAR's --guidance)
    time_grid: str | None = None

    def __post_init__(self):
        check_sampling(self.num_steps, self.guidance, self.time_grid)


def euler_times(num_steps: int, kind: str = "flowar") -> torch.Tensor:
    """float64 times from 1 to 0; len - 1 Euler steps.

    `flowar` (sampler.py): linspace(1, 0.3, N//2) ++ linspace(0.25, 0, N//2 + 1), i.e. N=25 gives 24 steps with a
    jump from 0.3 to 0.25; N=50 is uniform. `uniform`: linspace(1, 0, N + 1).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if kind not in TIME_GRIDS:
        raise ValueError(f"time_grid={kind!r}: allowed values are {list(TIME_GRIDS)}")
    if kind == "uniform" or num_steps == 50 or num_steps == 1:  # N=1: the official grid would take no step at all
        return torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    return torch.cat([torch.linspace(1, 0.3, num_steps // 2, dtype=torch.float64),
                      torch.linspace(0.25, 0, num_steps // 2 + 1, dtype=torch.float64)])


@torch.no_grad()
def euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                 times: torch.Tensor, guidance: ScaleGuidance, guidance_high: float = 1.0, guidance_low: float = 0.0,
                 inspect: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from times[0] to times[-1] in float64 (FlowAR's `euler_sampler`).

    `noise` holds the conditional rows then the unconditional ones. Where guidance is on (`guidance.active`, FlowAR's
    cfg_scale > 1, and guidance_low <= t <= guidance_high) both halves are evaluated at the conditional state and
    the velocities mixed by `guidance` move both halves; elsewhere each half follows its own. `velocity(x, t)` is
    called in the noise's dtype.
    """
    dtype, B = noise.dtype, noise.shape[0] // 2
    x = noise.to(torch.float64)
    for t_cur, t_next in zip(times[:-1], times[1:]):
        guided = guidance.active and guidance_low <= t_cur <= guidance_high
        inp = torch.cat([x[:B], x[:B]]) if guided else x
        t = (torch.ones(inp.shape[0], dtype=torch.float64, device=x.device) * t_cur).to(dtype)
        if inspect:
            inspect("t", t)
        d = velocity(inp.to(dtype), t).to(torch.float64)
        if guided:
            d = guidance(d[:B], d[B:])  # FlowAR: u + (c - u) * cfg_scale, the official operand order
            d = torch.cat([d, d])
        x = x + (t_next - t_cur) * d
    return x


class FlowHead(nn.Module):
    needs_discrete = False  # regresses continuous latents: pairs with a KL tokenizer or a VQ tokenizer's latent
    options_type = FlowOptions
    greedy_options = MappingProxyType({})  # no greedy variant: every scale is integrated the same way

    def __init__(self, width: int, cond_dim: int, vocab_size: int | None = None, token_dim: int | None = None,
                 flow_width: int = 1024, depth: int = 2, cross: bool = False, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, time_freq_dim: int = 256, rope_grid: float = 16,
                 zero_init_output: bool = False, num_steps: int = 25, guidance: float = 0.9,
                 time_grid: str = "flowar"):
        super().__init__()
        if token_dim is None:
            raise ValueError("head.token_dim: the latent channel count is needed (derived from the tokenizer)")
        check_sampling(num_steps, guidance, time_grid, prefix="head.")
        self.token_dim, self.num_steps, self.guidance, self.time_grid = token_dim, num_steps, guidance, time_grid
        self.net = FlowNet(token_dim, flow_width, width, depth, cross, num_heads, mlp_ratio, time_freq_dim, rope_grid,
                           zero_init_output)

    def var_init(self, init_head: float, init_adaln: float) -> None:
        """VAR's init_weights has no head-specific part here: the flow network keeps the trunc-normal linears."""

    # -- training --------------------------------------------------------------------------------------------------
    def training_loss(self, hidden: torch.Tensor, cond: torch.Tensor, targets: list[torch.Tensor], scales):
        """Per scale: t ~ U(0,1) per sample, eps ~ N(0,1), MSE of the velocity; scales weighted by n_k / n_K.

        Draws, per scale in order: rand(B,1,1) then randn_like(target) (the official RNG order)."""
        losses, per_scale = [], {}
        n_last = scales.token_counts[-1]
        for si, ((b, e), hw, x0) in enumerate(zip(scales.offsets, scales.sizes, targets)):
            x0 = x0.float().contiguous()  # randn_like follows the layout; the official targets are contiguous
            t = torch.rand((x0.shape[0], 1, 1), device=x0.device)
            noise = torch.randn_like(x0)
            x_t = (1 - t) * x0 + t * noise
            v = self.net(x_t, t.flatten(), hidden[:, b:e], hw).float()
            per_sample = (v - (noise - x0)).square().mean(dim=(1, 2))
            loss_k = per_sample.mean()
            losses.append(loss_k / n_last * (e - b))
            per_scale[si] = {"loss": loss_k.detach()}
        return sum(losses), per_scale

    # -- generation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, cond: torch.Tensor, guidance: ScaleGuidance, options: FlowOptions, *,
               si: int, size: tuple[int, int], generator=None, inspect=None):
        """Scale si, of `size`. hidden (2B, n, D): conditional rows then null-class rows, mixed by `guidance`.

        Each scale starts from pure noise (2B, n, token_dim), drawn from `generator` on its device. Returns the
        conditional half (B, n, token_dim) in fp32 and no soft codes."""
        num_steps = self.num_steps if options.num_steps is None else int(options.num_steps)
        high = self.guidance if options.guidance is None else options.guidance
        n = hidden.shape[1]
        device = generator.device if generator is not None else hidden.device
        noise = torch.randn((hidden.shape[0], n, self.token_dim), generator=generator, device=device).to(hidden.device)
        if inspect:
            inspect("noise", noise)
        context = self.net.context(hidden.float(), size)  # the condition's projections, once per scale
        times = euler_times(num_steps, options.time_grid or self.time_grid)
        velocity = GridVelocity(self.net, context, times[:-1].to(noise.dtype))  # t as euler_sample passes it
        out = euler_sample(velocity, noise, times, guidance, high, inspect=inspect)
        if inspect:
            inspect("sampler_out", out)
        B = hidden.shape[0] // 2
        return out[:B].float(), None

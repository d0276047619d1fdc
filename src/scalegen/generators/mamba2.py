"""Mamba2 (Dao & Gu, 2024) as M-VAR uses it: our own chunked SSD scan in plain PyTorch, mamba-ssm's kernels on GPU.

The parameters are `mamba_ssm.Mamba2`'s, name for name and shape for shape (in_proj, conv1d, dt_bias, A_log, D,
norm.weight, out_proj), so official checkpoints load without renaming. Per token t (mamba_ssm/modules/mamba2.py, as M-VAR's basic_mvar.py:134-140 builds it):

    [z | xBC | dt] = in_proj(u);  x, B, C = split(SiLU(causal depthwise conv(xBC)))
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ;  y_t = h_t C_t + D x_t ;  out = out_proj(RMSNorm(y * SiLU(z)))

`forward(u)` runs a whole sequence from the zero state (training); `step(u, state)` continues from a carried state
(the last d_conv-1 conv inputs and the SSM state) over a chunk of any length, which is how M-VAR's generation adds
one scale at a time. On CUDA tensors with `mamba-ssm` installed (extra `[mamba]`; its Triton kernels need no compiled
extension: an install made with MAMBA_SKIP_CUDA_BUILD=TRUE works) the same module runs mamba-ssm's Triton SSD chunk
scan, fused with causal-conv1d's conv when that is installed too (`choose`); anywhere else it runs our scan, conv and
gated norm (generators/mamba_ops.py: each one autograd node with its backward written out, saving its inputs only).
mamba-ssm is imported only on that CUDA path.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import sys
import types
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalegen.generators.mamba_ops import CausalConvSiLU, GatedRMSNormFn, ssd_scan

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "mamba_ssm")


class MambaState(NamedTuple):
    conv: torch.Tensor  # (B, conv_dim, d_conv - 1): the last pre-conv inputs
    ssm: torch.Tensor  # (B, nheads, headdim, d_state), mamba-ssm's layout


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) * weight per group of channels: mamba-ssm's RMSNormGated with norm_before_gate=False."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.eps, self.group_size = eps, group_size or dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return GatedRMSNormFn.apply(y, z, self.weight, self.eps, self.group_size, torch.is_grad_enabled()).to(y.dtype)


# ---- the mamba-ssm kernels, only on CUDA --------------------------------------------------------------------------

_KERNELS: dict | None = None
_LOGGED: set = set()
SSD_MODULE = "mamba_ssm.ops.triton.ssd_combined"
# how each mamba-ssm release names the causal-conv1d functions its fused path calls (None when not importable)
CONV_NAMES = ("causal_conv1d_fwd_function", "causal_conv1d_cuda")


class Choice(NamedTuple):
    """Which implementation a Mamba2 call runs: "torch" (our scan), "triton" (mamba-ssm's Triton SSD chunk scan
    after our conv) or "triton_fused" (its split-conv1d-scan with causal-conv1d's conv); the kernels; why."""
    name: str
    kernels: dict | None
    reason: str


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.info(message)


def _import_ssd():
    """mamba-ssm's Triton SSD module. Its package __init__ also imports Mamba-1's compiled extension, Mamba-3 and the
    language models (transformers); an install without them (MAMBA_SKIP_CUDA_BUILD=TRUE, no transformers) still
    has the Triton kernels, so when that __init__ fails the kernels are loaded with the package body skipped."""
    try:
        return importlib.import_module(SSD_MODULE)
    except ImportError as first:
        spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
        if spec is None or not spec.submodule_search_locations:
            raise first
        package = types.ModuleType("mamba_ssm")  # a bare package: its submodules import, its __init__ does not run
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["mamba_ssm"] = package
        return importlib.import_module(SSD_MODULE)


def mamba_kernels() -> dict | None:
    """mamba-ssm's Triton functions ("chunk_scan", and "split_conv1d_scan" when causal-conv1d is importable too), or
    None when they cannot be imported (the reason in `_KERNELS["error"]`). Called for CUDA tensors only."""
    global _KERNELS
    if _KERNELS is None:
        try:
            ssd = _import_ssd()
            _KERNELS = dict(chunk_scan=ssd.mamba_chunk_scan_combined)
            if any(getattr(ssd, name, None) is not None for name in CONV_NAMES):
                _KERNELS["split_conv1d_scan"] = ssd.mamba_split_conv1d_scan_combined
        except Exception as e:  # ImportError, no Triton, a broken build
            _KERNELS = {"error": f"{type(e).__name__}: {e}"}
    return None if "error" in _KERNELS else _KERNELS


def choose(is_cuda: bool, backend: str = "auto") -> Choice:
    """The implementation for a call on CUDA (`is_cuda`) or CPU tensors under `backend`; imports mamba-ssm only for
    CUDA tensors with backend auto or mamba_ssm. Raises where backend=mamba_ssm cannot be honoured."""
    if backend == "torch":
        return Choice("torch", None, "PyTorch chunked scan (backend=torch)")
    if not is_cuda:  # never import mamba-ssm for CPU tensors
        if backend == "mamba_ssm":
            raise RuntimeError("Mamba2 backend=mamba_ssm needs CUDA tensors; use backend=auto or torch on CPU")
        return Choice("torch", None, "PyTorch chunked scan (CPU tensors)")
    kernels = mamba_kernels()
    if kernels is None:
        reason = _KERNELS["error"]
        if backend == "mamba_ssm":
            raise RuntimeError(f"Mamba2 backend=mamba_ssm: the kernels are not importable ({reason}); "
                               "pip install 'scalegen[mamba]' on a CUDA machine, or use backend=auto")
        return Choice("torch", None, f"PyTorch chunked scan on CUDA (mamba-ssm unavailable: {reason})")
    if "split_conv1d_scan" in kernels:
        return Choice("triton_fused", kernels, "mamba-ssm Triton SSD + causal-conv1d (CUDA)")
    return Choice("triton", kernels, "mamba-ssm Triton SSD chunk scan, our conv (CUDA; causal-conv1d not installed)")


class Mamba2(nn.Module):
    """A Mamba2 mixer with mamba_ssm.Mamba2's parameters and defaults (M-VAR passes d_state 64, d_conv 4, expand 2).

    backend: "auto" (mamba-ssm kernels for CUDA tensors when installed, else the PyTorch scan), "torch" (always the
    PyTorch scan) or "mamba_ssm" (the kernels, an error where they are missing). `scan_chunk` is the chunk length
    of the PyTorch scan (64 is fastest on CPU); `chunk_size` is the kernels' (mamba-ssm's default 256).
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, A_init_range: tuple[float, float] = (1, 16), dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, bias: bool = False, conv_bias: bool = True,
                 chunk_size: int = 256, scan_chunk: int = 64, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"mamba backend must be one of {BACKENDS}, got {backend!r}")
        self.d_model, self.d_state, self.d_conv, self.headdim, self.ngroups = d_model, d_state, d_conv, headdim, ngroups
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"expand * d_model = {self.d_inner} is not divisible by headdim {headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"nheads {self.nheads} is not divisible by ngroups {ngroups}")
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.chunk_size, self.scan_chunk, self.backend = chunk_size, scan_chunk, backend

        # in_proj rows in mamba-ssm's order: z, x, B, C, dt
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=conv_bias)
        # mamba-ssm's init: dt log-uniform in [dt_min, dt_max] stored through the inverse softplus, A uniform in range
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, eps=1e-5, group_size=self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    # -- which implementation --------------------------------------------------------------------------------------
    def _choice(self, u: torch.Tensor) -> Choice:
        choice = choose(u.is_cuda, self.backend)
        _log_once(f"Mamba2: {choice.reason}")
        return choice

    # -- the pieces ------------------------------------------------------------------------------------------------
    def initial_state(self, batch: int, device=None, dtype=torch.float32) -> MambaState:
        return MambaState(torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
                          torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32))

    def _split(self, zxbcdt: torch.Tensor):
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _conv(self, xBC: torch.Tensor, prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv + SiLU over (b, l, conv_dim), continuing from `prev` (b, conv_dim, d_conv-1), the
        last inputs in mamba-ssm's conv-state layout. -> (output, the new conv state)."""
        keep = self.d_conv - 1
        if prev is None:
            prev = xBC.new_zeros(xBC.shape[0], keep, self.conv_dim)
        else:
            prev = prev.transpose(1, 2).to(xBC.dtype)
        out = CausalConvSiLU.apply(xBC, prev, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        tail = torch.cat((prev, xBC[:, -keep:]), dim=1)[:, -keep:]
        return out, tail.transpose(1, 2).contiguous()

    def _ssm_inputs(self, xBC: torch.Tensor, dt: torch.Tensor):
        b, l, _ = xBC.shape
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x = x.reshape(b, l, self.nheads, self.headdim)
        B, C = B.reshape(b, l, self.ngroups, self.d_state), C.reshape(b, l, self.ngroups, self.d_state)
        return x, B, C, dt

    def _mix(self, u: torch.Tensor, state: MambaState | None, kernels: dict | None):
        """The PyTorch path (and the stateful CUDA path: our conv, mamba-ssm's chunk scan). -> (out, new state)."""
        b, l, _ = u.shape
        z, xBC, dt = self._split(self.in_proj(u))
        xBC, conv_state = self._conv(xBC, None if state is None else state.conv)
        x, B, C, dt = self._ssm_inputs(xBC, dt)
        A = -torch.exp(self.A_log.float())
        ssm0 = None if state is None else state.ssm
        if kernels is None:
            with torch.autocast(u.device.type, enabled=False):  # the scan's matmuls stay float32 under mixed precision
                y, ssm = ssd_scan(x, F.softplus(dt.float() + self.dt_bias.float()), A, B, C, self.scan_chunk, ssm0)
            y = y + x.float() * self.D.float().view(-1, 1)
        else:
            y, ssm = kernels["chunk_scan"](x, dt, A, B, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
                                           initial_states=ssm0, return_final_states=True)
        y = self.norm(y.reshape(b, l, self.d_inner).to(u.dtype), z)
        return self.out_proj(y), MambaState(conv_state, ssm)

    # -- the two entry points --------------------------------------------------------------------------------------
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """A whole sequence (b, l, d_model) from the zero state -> (b, l, d_model)."""
        choice = self._choice(u)
        if choice.name != "triton_fused":
            return self._mix(u, None, choice.kernels)[0]
        return choice.kernels["split_conv1d_scan"](
            self.in_proj(u), self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, -torch.exp(self.A_log.float()),
            D=self.D, chunk_size=self.chunk_size, activation="silu", rmsnorm_weight=self.norm.weight,
            rmsnorm_eps=self.norm.eps, outproj_weight=self.out_proj.weight, outproj_bias=self.out_proj.bias,
            headdim=self.headdim, ngroups=self.ngroups, norm_before_gate=False)

    def step(self, u: torch.Tensor, state: MambaState | None = None) -> tuple[torch.Tensor, MambaState]:
        """Continue the sequence: u (b, l, d_model), any l >= 1, after `state` (None: the start) -> (out, new state).

        Feeding a sequence in pieces through `step` gives what `forward` gives on the whole of it.
        """
        return self._mix(u, state, self._choice(u).kernels)

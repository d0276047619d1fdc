"""Scale schedules: which token maps a model predicts, coarse to fine, and where they sit in the sequence.

A schedule is a tuple of (h, w) sizes. It knows the token counts, the offsets of each scale in the flat
sequence, the scale id of every position and the attention masks over scales: block-causal (a query sees every key
of its own and of coarser scales; VAR, FlexVAR, FlowAR) and block-diagonal (its own scale only; M-VAR), each as a
dense additive bias and as FlexAttention's BlockMask. Masks and level ids are built once per (schedule, device,
dtype) and shared, so a schedule drawn per training step or at sampling time costs one build; treat them as
read-only. The resampling used to move between scales lives here too, once: `area` down, `bicubic` up.
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F

Size = Union[int, Sequence[int]]

# VAR's `patch_nums` presets (arg_util.py): the side of each token map for 256 px and 512 px images.
VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
VAR_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def doubling(final: int) -> tuple[int, ...]:
    """1, 2, 4, ..., final (FlowAR's schedule); `final` must be a power of two."""
    if final < 1 or final & (final - 1):
        raise ValueError(f"doubling scales need a power-of-two final size, got {final}")
    return tuple(2**i for i in range(final.bit_length()))


@dataclass(frozen=True)
class ScaleSchedule:
    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, spec: "ScaleSchedule | Sequence[Size]") -> "ScaleSchedule":
        """Accepts a schedule, a list of sides (`[1, 2, 4]`) or of (h, w) pairs (`[[1, 2], [2, 4]]`)."""
        if isinstance(spec, ScaleSchedule):
            return spec
        sizes = []
        for s in spec:
            h, w = (int(s), int(s)) if isinstance(s, numbers.Integral) else (int(s[0]), int(s[1]))
            if h < 1 or w < 1:
                raise ValueError(f"scale sizes must be positive, got {tuple(spec)}")
            sizes.append((h, w))
        if not sizes:
            raise ValueError("a scale schedule needs at least one scale")
        return cls(tuple(sizes))

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def final(self) -> tuple[int, int]:
        return self.sizes[-1]

    @property
    def token_counts(self) -> list[int]:
        return [h * w for h, w in self.sizes]

    @property
    def num_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """[start, end) of each scale in the flat sequence (VAR's `begin_ends`)."""
        out, start = [], 0
        for n in self.token_counts:
            out.append((start, start + n))
            start += n
        return out

    def level_ids(self, device=None) -> torch.Tensor:
        """(L,) int64: the scale index of every position (VAR's `lvl_1L`). Shared: do not modify in place."""
        return _built(self, "levels", _device(device), torch.long)

    def bias(self, kind: str, device=None, dtype=torch.float32) -> torch.Tensor:
        """The dense additive mask of `kind` (block_causal | block_diagonal), as the two methods below."""
        if kind not in MASK_KINDS:
            raise ValueError(f"mask kind {kind!r}: allowed {MASK_KINDS}")
        return _built(self, kind, _device(device), dtype)

    def block_causal_bias(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """(L, L) additive mask: 0 where key scale <= query scale, -inf elsewhere. Shared: do not modify in place."""
        return _built(self, "block_causal", _device(device), dtype)

    def block_diagonal_bias(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """(L, L) additive mask: 0 where query and key are in the same scale, -inf elsewhere (M-VAR's attention)."""
        return _built(self, "block_diagonal", _device(device), dtype)

    def block_mask(self, kind: str = "block_causal", device=None):
        """FlexAttention's BlockMask of `kind` (block_causal | block_diagonal: the same pattern as the dense bias of
        that name) over the whole sequence, for any batch and head count. Shared: do not modify."""
        if kind not in MASK_KINDS:
            raise ValueError(f"mask kind {kind!r}: allowed {MASK_KINDS}")
        return _block_mask(self, kind, _device(device))

    def check_final(self, latent_hw: Sequence[int], key: str = "scales") -> None:
        if tuple(latent_hw) != self.final:
            raise ValueError(f"{key}: the last scale {self.final} must equal the latent size {tuple(latent_hw)}")


MASK_KINDS = ("block_causal", "block_diagonal")


def _device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


@functools.lru_cache(maxsize=8)  # bounded: a random schedule per training step would otherwise pile up masks
def _built(sched: ScaleSchedule, what: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The level ids or a mask of `sched`; built outside inference mode, so a mask first made during validation
    can still be saved for backward by a later training step."""
    with torch.inference_mode(False), torch.no_grad():
        counts = enumerate(sched.token_counts)
        lvl = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in counts])
        if what == "levels":
            return lvl
        allowed = lvl[:, None] >= lvl[None, :] if what == "block_causal" else lvl[:, None] == lvl[None, :]
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


@functools.lru_cache(maxsize=8)
def _block_mask(sched: ScaleSchedule, kind: str, device: torch.device):
    """The BlockMask whose mask_mod compares the level ids of query and key (128-token blocks, torch's default)."""
    from torch.nn.attention.flex_attention import create_block_mask  # loads torch's compiler stack (~1 s): on use only

    L = sched.num_tokens
    with torch.inference_mode(False), torch.no_grad():
        # padded to whole blocks with a level past the last: the kernels may evaluate mask_mod on the last block's padding
        pad = -L % 128
        lvl = torch.cat((sched.level_ids(device), torch.full((pad,), len(sched), dtype=torch.long, device=device)))
        if kind == "block_causal":
            def mask_mod(b, h, q, k):
                return lvl[q] >= lvl[k]
        else:
            def mask_mod(b, h, q, k):
                return lvl[q] == lvl[k]
        return create_block_mask(mask_mod, None, None, L, L, device=device)


def area_down(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling, the `area` mode every official code base uses to go to a coarser scale."""
    return F.interpolate(x, size=size, mode="area")


def bicubic_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, align_corners=False, no antialias: the official token-map upsampling."""
    return F.interpolate(x, size=size, mode="bicubic")

"""The parity harness the four `test_parity_<method>.py` modules share: compare every quantity of one golden file,
record the largest |ours - golden| of each (the `max_diffs` fixture of conftest.py prints them at the end of the
module), and fail once, listing every mismatch of the file.

Floats: within an absolute tolerance, NaN nowhere, infinite entries (masked logits) only where the golden has the
same infinity. Indices, labels, generator states: bit for bit, same dtype. Losses: within a relative tolerance.
"""
from __future__ import annotations

import functools
import math
import zlib
from pathlib import Path

import pytest
import torch


@functools.lru_cache(maxsize=None)
def load_golden(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Parity:
    """Compares the quantities of one golden file, records the max |diff| of each, and fails once listing all misses.

    `quantity` keys the table of maxima; `where` (a sample run, a variant) only prefixes the mismatch messages.
    """

    def __init__(self, file: str, maxima: dict, atol: float | None = None):
        self.file, self.maxima, self.atol, self.misses = file, maxima, atol, []

    def _record(self, quantity: str, diff: float, tol: str) -> None:
        key = (self.file, quantity)
        old = self.maxima.get(key, (0.0, tol))[0]
        self.maxima[key] = (old if math.isnan(old) or not (math.isnan(diff) or diff > old) else diff, tol)

    def _each(self, name: str, ours, ref) -> list:
        if isinstance(ref, (list, tuple)):
            if len(ours) != len(ref):
                self.misses.append(f"{name}: {len(ours)} entries, golden has {len(ref)}")
                return []
            return [(f"{name}[{i}]", torch.as_tensor(a), torch.as_tensor(b)) for i, (a, b) in enumerate(zip(ours, ref))]
        return [(name, torch.as_tensor(ours), torch.as_tensor(ref))]

    def _shape_ok(self, name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.shape != b.shape:
            self.misses.append(f"{name}: shape {tuple(a.shape)}, golden {tuple(b.shape)}")
        return a.shape == b.shape

    def close(self, quantity: str, ours, ref, atol: float | None = None, where: str = "") -> None:
        """Float tensors (or lists of them) within `atol` (default: the one given to Parity)."""
        atol = self.atol if atol is None else atol
        assert atol is not None, f"{quantity}: no tolerance (pass atol, or give Parity one)"
        for name, a, b in self._each(where + quantity, ours, ref):
            if not self._shape_ok(name, a, b):
                continue
            a, b = a.detach().double(), b.detach().double()
            if a.isnan().any() or b.isnan().any():
                self._record(quantity, math.nan, f"atol {atol:g}")
                self.misses.append(f"{name}: NaN entries ({int(a.isnan().sum())} ours, {int(b.isnan().sum())} golden)")
                continue
            other_inf = ((a == math.inf) ^ (b == math.inf)) | ((a == -math.inf) ^ (b == -math.inf))
            if other_inf.any():
                first = tuple(torch.nonzero(other_inf)[0].tolist())
                self.misses.append(f"{name}: infinite entries at other places ({int(a.isinf().sum())} ours, "
                                   f"{int(b.isinf().sum())} golden; first at {first}: ours {a[first].item():.7g}, "
                                   f"golden {b[first].item():.7g})")
                continue
            diff = torch.where(b.isinf(), 0.0, a - b).abs()
            worst = diff.max().item() if diff.numel() else 0.0
            self._record(quantity, worst, f"atol {atol:g}")
            if not worst <= atol:
                at = tuple(torch.nonzero(diff == worst)[0].tolist())
                self.misses.append(f"{name}: max |diff| {worst:.3g} > atol {atol:g} "
                                   f"(at {at}: ours {a[at].item():.7g}, golden {b[at].item():.7g})")

    def exact(self, quantity: str, ours, ref, where: str = "") -> None:
        """Tensors (indices, labels, generator states; or lists of them) bit for bit, in the golden's dtype."""
        for name, a, b in self._each(where + quantity, ours, ref):
            if not self._shape_ok(name, a, b):
                continue
            if a.dtype != b.dtype:
                self.misses.append(f"{name}: dtype {a.dtype}, golden {b.dtype}")
            wrong = a != b  # NaN differs from NaN, so a NaN anywhere is a miss; equal infinities (masks) agree
            diff = torch.where(wrong, (a.double() - b.double()).abs(), 0.0)
            self._record(quantity, diff.max().item() if diff.numel() else 0.0, "exact")
            if wrong.any():
                first = tuple(torch.nonzero(wrong)[0].tolist())
                self.misses.append(f"{name}: {int(wrong.sum())}/{wrong.numel()} entries differ (first at {first}: "
                                   f"ours {a[first].item()}, golden {b[first].item()})")

    def relative(self, quantity: str, ours, ref, rtol: float, where: str = "") -> None:
        """A scalar (a loss) within `rtol` of the golden value; the recorded maximum is the absolute diff."""
        diff = abs(float(ours) - float(ref))
        self._record(quantity, diff, f"rtol {rtol:g}")
        if not diff <= rtol * abs(float(ref)):
            self.misses.append(f"{where}{quantity}: ours {float(ours):.8g}, golden {float(ref):.8g}, "
                               f"|diff| {diff:.3g} (rel {diff / max(abs(float(ref)), 1e-30):.3g} > rtol {rtol:g})")

    def equal(self, what: str, ours, ref) -> None:
        """Plain values (config fields, key lists); a set golden lists what is missing and what is unexpected."""
        if isinstance(ref, (set, frozenset)):
            missing, extra = sorted(ref - set(ours)), sorted(set(ours) - ref)
            if missing or extra:
                self.misses.append(f"{what}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                                   f"unexpected {extra[:8]}{'...' if len(extra) > 8 else ''}")
        elif ours != ref:
            self.misses.append(f"{what}: ours {ours!r}, golden {ref!r}")

    def same_tensors(self, what: str, ours: dict, ref: dict) -> None:
        """Two state dicts with the same keys hold bit-identical tensors."""
        differ = [k for k in ref if k in ours and not (ours[k].shape == ref[k].shape and torch.equal(ours[k], ref[k]))]
        if differ:
            self.misses.append(f"{what}: {len(differ)} tensors differ, e.g. {differ[:5]}")

    def finish(self) -> None:
        if self.misses:
            pytest.fail(f"{self.file}: {len(self.misses)} mismatches against the official code:\n  " + "\n  ".join(self.misses),
                        pytrace=False)


def keyed_vae_state(golden: dict) -> dict:
    """The tiny VQVAE of an M-VAR golden, from its README's rule: one generator seeded with crc32(key) per tensor."""
    state = {}
    for key, (_, _, shape) in golden["vqvae_key_checksums"].items():
        shape = tuple(shape)
        r = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8"))))
        module = key.rsplit(".", 2)[-2] if "." in key else ""
        if key.endswith("ema_vocab_hit_SV"):
            state[key] = torch.zeros(shape)
        elif module.startswith("norm"):
            state[key] = 1 + 0.1 * r if key.endswith(".weight") else 0.1 * r
        elif key == "quantize.embedding.weight":
            state[key] = 0.5 * r
        elif key.endswith(".weight"):
            state[key] = r / math.prod(shape[1:]) ** 0.5
        else:
            state[key] = 0.02 * r
    return state

"""The step guard: an optimizer step whose loss or global gradient norm is non-finite, or a spike against a rolling
window of accepted steps, is skipped (no weight, optimizer-state or EMA change); too many in a row stop the run.

In the spirit of Composer's KillLossSpike and torchtitan's halt on a non-finite loss. The window lives on the device
and the verdict is one boolean tensor, so a step costs one host sync (the skip decision itself), not one per check.
"""
from __future__ import annotations

import torch


class StepGuard:
    """Rolling-window outlier checks (config node `guard`).

    window: accepted steps in the rolling mean; the spike checks start once it is full (0: no spike checks);
    loss_factor / grad_factor: a loss / global gradient norm (before clipping) above factor x the window's mean is an
    outlier (null: that check off); max_in_row: this many outliers in a row stop the run.
    """

    def __init__(self, window: int = 100, loss_factor: float | None = 3.0, grad_factor: float | None = 10.0,
                 max_in_row: int = 5):
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window={window!r}: needs an integer >= 0 (0: no spike checks)")
        for name, factor in (("loss_factor", loss_factor), ("grad_factor", grad_factor)):
            if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1):
                raise ValueError(f"{name}={factor!r}: needs a number > 1 (the multiple of the window's mean), or null")
        if isinstance(max_in_row, bool) or not isinstance(max_in_row, int) or max_in_row < 1:
            raise ValueError(f"max_in_row={max_in_row!r}: needs an integer >= 1")
        self.window, self.loss_factor, self.grad_factor, self.max_in_row = window, loss_factor, grad_factor, max_in_row
        self.history: torch.Tensor | None = None  # (window, 2): loss, grad norm of the last accepted steps
        self.filled, self.pos = 0, 0
        self.outliers_in_row, self.outliers_total = 0, 0

    @property
    def spikes_on(self) -> bool:
        return self.window > 0 and (self.loss_factor is not None or self.grad_factor is not None)

    def verdict(self, loss: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(finite, calm) as 0-d bool tensors on the device; no host sync."""
        loss, norm = loss.detach().float(), norm.detach().float()
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        calm = torch.ones_like(finite)
        if self.spikes_on and self.filled >= self.window:
            mean = self._history(loss.device).mean(dim=0)
            if self.loss_factor is not None:
                calm = calm & (loss <= self.loss_factor * mean[0])
            if self.grad_factor is not None:
                calm = calm & (norm <= self.grad_factor * mean[1])
        return finite, calm

    def accept(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """An accepted step enters the window (device ops only) and ends a run of outliers."""
        self.outliers_in_row = 0
        if not self.spikes_on:
            return
        self._history(loss.device)[self.pos] = torch.stack([loss.detach().float(), norm.detach().float()])
        self.pos, self.filled = (self.pos + 1) % self.window, min(self.filled + 1, self.window)

    def _history(self, device: torch.device) -> torch.Tensor:
        if self.history is None:
            self.history = torch.zeros(self.window, 2, device=device)
        elif self.history.device != device:  # restored from a checkpoint on the CPU
            self.history = self.history.to(device)
        return self.history

    def outlier(self, loss: float, norm: float, step: int) -> str:
        """Count an outlier; returns the warning, or raises FloatingPointError at `max_in_row` in a row."""
        self.outliers_in_row += 1
        self.outliers_total += 1
        mean = self.history.mean(dim=0).tolist()
        msg = (f"outlier step {step}: loss {loss:.4g} (window mean {mean[0]:.4g}, guard.loss_factor {self.loss_factor}), "
               f"gradient norm {norm:.4g} (window mean {mean[1]:.4g}, guard.grad_factor {self.grad_factor}): step "
               f"skipped ({self.outliers_in_row} in a row)")
        if self.outliers_in_row >= self.max_in_row:
            raise FloatingPointError(f"{msg}; stopping after guard.max_in_row={self.max_in_row} in a row (lower the LR, "
                                     "resume from an earlier checkpoint, or raise the guard's factors)")
        return msg

    def state_dict(self) -> dict:
        return {"history": None if self.history is None else self.history.cpu(), "filled": self.filled,
                "pos": self.pos, "outliers_in_row": self.outliers_in_row, "outliers_total": self.outliers_total}

    def load_state_dict(self, state: dict) -> None:
        history = state.get("history")
        if history is not None and history.shape[0] != self.window:  # another window: start it afresh
            history, state = None, {**state, "filled": 0, "pos": 0}
        self.history = history
        self.filled, self.pos = state.get("filled", 0), state.get("pos", 0)
        self.outliers_in_row, self.outliers_total = state.get("outliers_in_row", 0), state.get("outliers_total", 0)

"""The step guard: an optimizer step whose loss or global gradient norm is non-finite, or a spike against a rolling
window of accepted steps, is skipped (no weight, optimizer-state or EMA change); too many in a row stop the run.

In the spirit of Composer's KillLossSpike and torchtitan's halt on a non-finite loss. The window and the counters
live on the device and every step is judged and recorded with device ops only: the host reads them at logging
intervals (`counts`), where the module prints the warnings and stops a run that reached `max_in_row`.
"""
from __future__ import annotations

import torch

# the entries of StepGuard.counts
FILLED, POS, IN_ROW, TOTAL = range(4)


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
        self.counts = torch.zeros(4, dtype=torch.long)  # filled, pos, outliers in a row, outliers in all (device)

    @property
    def spikes_on(self) -> bool:
        return self.window > 0 and (self.loss_factor is not None or self.grad_factor is not None)

    # host reads (a device sync each): for reports, checkpoints and tests, never inside a step
    filled = property(lambda self: int(self.counts[FILLED]))
    pos = property(lambda self: int(self.counts[POS]))
    outliers_in_row = property(lambda self: int(self.counts[IN_ROW]))
    outliers_total = property(lambda self: int(self.counts[TOTAL]))

    def _on(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(history or None without spike checks, counts) on `device` (restored from a checkpoint on the CPU: moved
        once)."""
        if self.history is None and self.spikes_on:
            self.history = torch.zeros(self.window, 2, device=device)
        if self.history is not None and self.history.device != device:
            self.history = self.history.to(device)
        if self.counts.device != device:
            self.counts = self.counts.to(device)
        return self.history, self.counts

    def verdict(self, loss: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(finite, calm) as 0-d bool tensors on the device; no host sync."""
        loss, norm = loss.detach().float(), norm.detach().float()
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        calm = torch.ones_like(finite)
        if self.spikes_on:
            history, counts = self._on(loss.device)
            mean = history.mean(dim=0)
            if self.loss_factor is not None:
                calm = calm & (loss <= self.loss_factor * mean[0])
            if self.grad_factor is not None:
                calm = calm & (norm <= self.grad_factor * mean[1])
            calm = calm | (counts[FILLED] < self.window)  # the checks start once the window is full
        return finite, calm

    def record(self, ok: torch.Tensor, outlier: torch.Tensor, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """Device ops only: an accepted step (`ok`) enters the window and ends a run of outliers; an outlier is
        counted; a step skipped for another reason (non-finite) changes nothing here."""
        history, counts = self._on(loss.device)
        in_row = torch.where(ok, 0, counts[IN_ROW] + outlier.long())
        filled, pos = counts[FILLED], counts[POS]
        if self.spikes_on:
            at = pos.view(1)
            row = torch.stack([loss.detach().float(), norm.detach().float()]).view(1, 2)
            history.index_copy_(0, at, torch.where(ok, row, history.index_select(0, at)))
            filled = torch.where(ok, (filled + 1).clamp(max=self.window), filled)
            pos = torch.where(ok, (pos + 1) % self.window, pos)
        counts.copy_(torch.stack([filled, pos, in_row, counts[TOTAL] + outlier.long()]))

    def outlier_message(self, loss: float, norm: float, step: int, in_row: int) -> str:
        """The warning for an outlier step (the window's mean as it is now)."""
        mean = self.history.mean(dim=0).tolist()
        return (f"outlier step {step}: loss {loss:.4g} (window mean {mean[0]:.4g}, guard.loss_factor {self.loss_factor}), "
               f"gradient norm {norm:.4g} (window mean {mean[1]:.4g}, guard.grad_factor {self.grad_factor}): step "
               f"skipped ({in_row} in a row)")

    def check_in_row(self, msg: str, in_row: int) -> None:
        """Stop the run when `max_in_row` outliers are in a row (read at a logging interval)."""
        if in_row >= self.max_in_row:
            raise FloatingPointError(f"{msg}; stopping after guard.max_in_row={self.max_in_row} in a row (lower the LR, "
                                     "resume from an earlier checkpoint, or raise the guard's factors)")

    def state_dict(self) -> dict:
        filled, pos, in_row, total = self.counts.tolist()
        return {"history": None if self.history is None else self.history.cpu(), "filled": filled,
                "pos": pos, "outliers_in_row": in_row, "outliers_total": total}

    def load_state_dict(self, state: dict) -> None:
        history = state.get("history")
        if history is not None and history.shape[0] != self.window:  # another window: start it afresh
            history, state = None, {**state, "filled": 0, "pos": 0}
        self.history = history
        self.counts = torch.tensor([state.get("filled", 0), state.get("pos", 0), state.get("outliers_in_row", 0),
                                    state.get("outliers_total", 0)], dtype=torch.long)

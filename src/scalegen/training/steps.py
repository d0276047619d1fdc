"""Device-side accounting of the training steps between two logged rows: the non-finite counters, the last skipped
step (what, when, its loss and gradient norm) and the running sums of the logged per-scale values. Every step
writes it with device ops only; the host reads all of it in one transfer (`read`) at a logging interval."""
from __future__ import annotations

import torch

# the entries of StepLedger.values
NONFINITE_IN_ROW, NONFINITE_TOTAL, OK, BAD_KIND, BAD_STEP, BAD_LOSS, BAD_NORM, BAD_IN_ROW = range(8)
NONFINITE, OUTLIER = 1, 2  # BAD_KIND


class StepLedger:
    def __init__(self):
        self.values = torch.zeros(8, dtype=torch.float64)
        self.sums: dict[str, torch.Tensor] = {}  # logged name -> (sum, accepted steps) since the last read
        self.reported = (0, 0)  # (non-finite, outlier) totals the host has already warned about

    def _on(self, device: torch.device) -> torch.Tensor:
        if self.values.device != device:  # restored from a checkpoint, or the first step: moved once
            self.values = self.values.to(device)
        return self.values

    def record(self, ok: torch.Tensor, nonfinite: torch.Tensor, outlier: torch.Tensor, loss: torch.Tensor,
               norm: torch.Tensor, step: int, outliers_in_row: torch.Tensor) -> None:
        """One step's verdict (0-d bool tensors), no host sync: `step` enters as a fill, not a copy."""
        v = self._on(ok.device)
        in_row = torch.where(ok, 0.0, v[NONFINITE_IN_ROW] + nonfinite.double())
        bad = nonfinite | outlier
        kind = torch.where(nonfinite, float(NONFINITE), torch.where(outlier, float(OUTLIER), v[BAD_KIND]))
        bad_in_row = torch.where(nonfinite, in_row, torch.where(outlier, outliers_in_row.double(), v[BAD_IN_ROW]))
        at = torch.full((), float(step), dtype=torch.float64, device=v.device)
        v.copy_(torch.stack([in_row, v[NONFINITE_TOTAL] + nonfinite.double(), ok.double(), kind,
                             torch.where(bad, at, v[BAD_STEP]), torch.where(bad, loss.detach().double(), v[BAD_LOSS]),
                             torch.where(bad, norm.detach().double(), v[BAD_NORM]), bad_in_row]))

    def accumulate(self, ok: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Add an accepted step's values to the running sums (a skipped step adds nothing)."""
        for name, value in values.items():
            total = self.sums.get(name)
            if total is None:
                total = self.sums[name] = torch.zeros(2, dtype=torch.float64, device=ok.device)
            total += torch.stack([torch.where(ok, value.detach().double(), 0.0), ok.double()])

    def read(self, guard_counts: torch.Tensor) -> tuple[list[float], list[int], dict[str, torch.Tensor]]:
        """(values, the guard's counts, {name: mean over the accepted steps} of the names that had one), in one
        device-to-host transfer; the sums start afresh."""
        sums = dict(self.sums)
        flat = torch.cat([self.values, guard_counts.to(self.values), *(s[1:] for s in sums.values())]).tolist()
        n = len(self.values)
        values, counts, steps = flat[:n], [int(c) for c in flat[n:n + 4]], flat[n + 4:]
        self.sums = {}
        means = {name: (s[0] / k).float() for (name, s), k in zip(sums.items(), steps) if k > 0}
        return values, counts, means

    def totals(self) -> tuple[int, int]:
        """(non-finite steps in a row, in all): a host read, for checkpoints and reports."""
        in_row, total = self.values[:2].tolist()
        return int(in_row), int(total)

    def load(self, in_row: int, total: int) -> None:
        self.values = torch.zeros(8, dtype=torch.float64)
        self.values[NONFINITE_IN_ROW], self.values[NONFINITE_TOTAL] = in_row, total

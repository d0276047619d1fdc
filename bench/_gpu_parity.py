"""A pytest plugin that runs the parity tests (tests/test_parity_*.py) on another device and precision, for
bench/gpu_check.py (which sets SETTINGS and reads RECORDER in process), or on the command line:
`python -m pytest -p _gpu_parity tests/test_parity_var.py` with bench/ on sys.path and

    SCALEGEN_PARITY_DEVICE=cuda     where every tensor the tests make lives (the goldens stay on the CPU)
    SCALEGEN_PARITY_BF16=1          run each test under bf16 autocast (as bf16-mixed training does)
    SCALEGEN_PARITY_OUT=file.json   where the measured differences go

Every torch call of a test's setup and body runs under `OnDevice`, a TorchFunctionMode that moves its tensor
arguments and results to the device, except a draw from a CPU `torch.Generator` (the goldens' seeded draws), which
runs on the CPU with the same generator and comes back, so the sampled indices can agree with the golden ones.
Under bf16 the tokenizers stay fp32, as in training (`fp32_tokenizers`).
The parity harness records every quantity: float quantities as the max |ours - golden|, indices as the share of
entries that agree; `finish` does not fail (the caller judges against its own tolerance).
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

KEEP = {"cpu", "numpy", "tolist", "item", "to", "__array__", "__array_wrap__", "__get__", "__set__", "__reduce_ex__",
        "data_ptr", "get_device", "__repr__", "__format__", "__len__", "__iter__", "__bool__"}  # no move: the call as is


class OnDevice(TorchFunctionMode):
    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)

    def _to(self, tree, device):
        return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) and t.device != device else t, tree)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in KEEP:
            return func(*args, **kwargs)
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator) and generator.device.type == "cpu" and self.device.type != "cpu":
            cpu_args, cpu_kwargs = self._to(args, torch.device("cpu")), self._to(kwargs, torch.device("cpu"))
            out = func(*cpu_args, **cpu_kwargs)
            if name.endswith("_") and args and isinstance(args[0], torch.Tensor):  # in place: into the caller's tensor
                return args[0].copy_(out)
            return self._to(out, self.device)
        return self._to(func(*self._to(args, self.device), **self._to(kwargs, self.device)), self.device)


class Recorder:
    """Wraps the parity harness's comparisons: every quantity is recorded, none fails the test."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def _row(self, check, quantity: str) -> dict:
        return self.rows.setdefault(f"{check.file} {quantity}", {"file": check.file, "quantity": quantity})

    def install(self, monkeypatch, parity) -> None:
        recorder = self

        def close(check, quantity, ours, ref, atol=None, where=""):
            for _, a, b in check._each(where + quantity, ours, ref):
                row = recorder._row(check, quantity)
                if a.shape != b.shape:
                    row["error"] = f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
                    continue
                a, b = a.detach().cpu().double(), b.detach().cpu().double()
                diff = torch.where(b.isinf() & (a == b), 0.0, a - b).abs()
                worst = diff.max().item() if diff.numel() else 0.0
                row["max_diff"] = max(row.get("max_diff", 0.0), worst) if worst == worst else float("nan")

        def exact(check, quantity, ours, ref, where=""):
            for _, a, b in check._each(where + quantity, ours, ref):
                row = recorder._row(check, quantity)
                if a.shape != b.shape:
                    row["error"] = f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
                    continue
                same = (a.detach().cpu() == b.detach().cpu())
                row["agree"] = row.get("agree", 0) + int(same.sum())
                row["count"] = row.get("count", 0) + same.numel()

        def relative(check, quantity, ours, ref, rtol, where=""):
            row = recorder._row(check, quantity)
            row["max_diff"] = max(row.get("max_diff", 0.0), abs(float(ours) - float(ref)))

        monkeypatch.setattr(parity.Parity, "close", close)
        monkeypatch.setattr(parity.Parity, "exact", exact)
        monkeypatch.setattr(parity.Parity, "relative", relative)
        monkeypatch.setattr(parity.Parity, "finish", lambda check: None)


RECORDER = Recorder()
# what a run measures: set by the caller of pytest.main (gpu_check.py), or from the environment on the command line
SETTINGS = {"device": os.environ.get("SCALEGEN_PARITY_DEVICE", "cpu"),
            "bf16": os.environ.get("SCALEGEN_PARITY_BF16") == "1", "out": os.environ.get("SCALEGEN_PARITY_OUT")}


def fp32_tokenizers(monkeypatch) -> None:
    """The project's precision policy under bf16: the tokenizer stays fp32 (GeneratorModule.prepare turns autocast off
    around it), so every method of the tokenizer classes runs with autocast off and float32 tensor arguments."""
    import importlib
    import pkgutil
    import types

    import scalegen.tokenizers as package
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for cls in vars(module).values():
            if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__ == module.__name__):
                continue
            for name, fn in list(vars(cls).items()):
                if isinstance(fn, types.FunctionType) and not (name.startswith("__") and name != "__call__"):
                    monkeypatch.setattr(cls, name, _in_fp32(fn))


def _in_fp32(fn):
    def run(*args, **kwargs):
        to32 = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        with torch.autocast(SETTINGS["device"].split(":")[0], enabled=False):
            return fn(*tree_map(to32, args), **tree_map(to32, kwargs))
    return run


@pytest.fixture(autouse=True)
def _record_parity(monkeypatch):
    import parity  # tests/parity.py, on sys.path under pytest
    RECORDER.install(monkeypatch, parity)
    if SETTINGS["bf16"]:
        fp32_tokenizers(monkeypatch)
    yield


def _context() -> ExitStack:
    device = SETTINGS["device"]
    stack = ExitStack()
    if SETTINGS["bf16"]:
        stack.enter_context(torch.autocast(torch.device(device).type, dtype=torch.bfloat16))
    stack.enter_context(OnDevice(device))
    return stack


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _context():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _context():
        yield


def pytest_runtest_logreport(report):
    if report.failed:  # an error of the test itself (a comparison never fails here)
        name = report.nodeid.rsplit("[", 1)[-1].rstrip("]")
        message = str(report.longrepr).strip().splitlines()[-1][:200] if report.longrepr else "failed"
        RECORDER.rows[f"{name} (test)"] = {"file": name, "quantity": f"({report.when})", "error": message}


def pytest_configure(config):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the goldens were made without TF32
    torch.backends.cudnn.allow_tf32 = False


def pytest_unconfigure(config):
    out = SETTINGS["out"]
    if out:
        with open(out, "w") as f:
            json.dump(list(RECORDER.rows.values()), f)

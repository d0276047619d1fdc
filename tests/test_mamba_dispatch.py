"""Which Mamba2 implementation runs (`scalegen.generators.mamba2.choose`), checked on the CPU with fake mamba-ssm
modules in sys.modules: its Triton SSD chunk scan for CUDA tensors when importable, fused with causal-conv1d's conv
only when that is importable too, our scan otherwise; the CPU path imports neither package."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

import pytest
import torch

from scalegen.generators import mamba2 as mamba2_module
from scalegen.generators.mamba2 import Mamba2, choose

PACKAGES = ("mamba_ssm", "causal_conv1d")


class ImportWatch(importlib.abc.MetaPathFinder):
    """Records every attempt to import mamba-ssm or causal-conv1d (and lets it go on)."""

    def __init__(self):
        self.seen = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PACKAGES:
            self.seen.append(name)
        return None


class FakePackages(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves fake mamba_ssm modules through the import system: `modules` maps a name to its module, or to the
    ImportError its import raises (as the package __init__ does without transformers or its compiled extension)."""

    def __init__(self, modules: dict):
        self.modules = modules

    def find_spec(self, name, path=None, target=None):
        if name not in self.modules:
            return None
        spec = importlib.machinery.ModuleSpec(name, self, is_package=not name.endswith("ssd_combined"))
        if spec.submodule_search_locations is not None:
            spec.submodule_search_locations.append(f"/fake/{name.replace('.', '/')}")
        return spec

    def create_module(self, spec):
        module = self.modules[spec.name]
        if isinstance(module, Exception):
            raise module
        return module

    def exec_module(self, module):
        pass


def fake_ssd(monkeypatch, conv: bool, init_fails: bool = False) -> None:
    """Importable fake mamba_ssm packages whose ssd_combined module has the two kernels; `conv`: causal-conv1d's
    functions are importable there; `init_fails`: importing the package itself raises."""
    ssd = types.ModuleType("mamba_ssm.ops.triton.ssd_combined")
    ssd.mamba_chunk_scan_combined = lambda *a, **k: "chunk_scan"
    ssd.mamba_split_conv1d_scan_combined = lambda *a, **k: "split_conv1d_scan"
    ssd.causal_conv1d_fwd_function = object() if conv else None
    modules = {name: types.ModuleType(name) for name in ("mamba_ssm.ops", "mamba_ssm.ops.triton")}
    modules["mamba_ssm.ops.triton.ssd_combined"] = ssd
    modules["mamba_ssm"] = ImportError("No module named 'transformers'") if init_fails else types.ModuleType("mamba_ssm")
    monkeypatch.setattr(sys, "meta_path", [FakePackages(modules), *sys.meta_path])


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(mamba2_module, "_KERNELS", None)
    monkeypatch.setattr(mamba2_module, "_LOGGED", set())
    before = {name: module for name, module in sys.modules.items() if name.split(".")[0] in PACKAGES}
    yield
    for name in [n for n in sys.modules if n.split(".")[0] in PACKAGES]:
        del sys.modules[name]
    sys.modules.update(before)


@pytest.mark.parametrize("conv, name", [(True, "triton_fused"), (False, "triton")])
def test_cuda_tensors_take_the_triton_kernels_fused_only_with_causal_conv1d(monkeypatch, conv, name):
    fake_ssd(monkeypatch, conv)
    choice = choose(is_cuda=True)
    assert choice.name == name and choice.kernels["chunk_scan"]() == "chunk_scan"
    assert ("split_conv1d_scan" in choice.kernels) == conv
    assert choose(is_cuda=True, backend="mamba_ssm").name == name


def test_the_kernels_load_when_the_package_init_cannot(monkeypatch):
    fake_ssd(monkeypatch, conv=False, init_fails=True)
    with pytest.raises(ImportError, match="transformers"):  # a plain import of the kernels' module fails here
        importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    choice = choose(is_cuda=True)
    assert choice.name == "triton" and choice.kernels["chunk_scan"]() == "chunk_scan"
    assert sys.modules["mamba_ssm"].__path__ == ["/fake/mamba_ssm"]  # the bare package, its __init__ not run


def test_without_mamba_ssm_cuda_falls_back_to_our_scan_or_fails_for_backend_mamba_ssm(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # import mamba_ssm raises ImportError
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.triton.ssd_combined", None)
    choice = choose(is_cuda=True)
    assert choice.name == "torch" and choice.kernels is None and "mamba-ssm unavailable" in choice.reason
    with pytest.raises(RuntimeError, match="backend=mamba_ssm: the kernels are not importable"):
        choose(is_cuda=True, backend="mamba_ssm")


def test_backend_torch_and_cpu_tensors_import_neither_package(monkeypatch):
    fake_ssd(monkeypatch, conv=True)  # importable, and still not touched
    watch = ImportWatch()
    monkeypatch.setattr(sys, "meta_path", [watch, *sys.meta_path])
    assert choose(is_cuda=True, backend="torch").name == "torch"
    assert choose(is_cuda=False).name == "torch"
    assert mamba2_module._KERNELS is None and watch.seen == []
    m = Mamba2(64, d_state=16, headdim=32)
    out, state = m.step(torch.randn(1, 5, 64))
    m(torch.randn(1, 5, 64)).sum().backward()
    assert mamba2_module._KERNELS is None and watch.seen == []
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        choose(is_cuda=False, backend="mamba_ssm")

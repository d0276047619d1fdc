"""What the test files share: the repository path, the Hydra compose helper, tiny stand-ins, thread counts, and
where the golden files of the official code live.

Golden files: `tests/golden/` (in the repository; each method's folder says how its files were made and has the
script that regenerates them), plus the folders of the same layout listed in `$SCALEGEN_PARITY_DIR` (separated by
`os.pathsep`), which add files. A test marked `@pytest.mark.parity("<method>")` that takes a `golden_file` argument
runs once per `.pt` file in `<folder>/<method>/` of every folder found at collection, with the file name as its id
(a file that repeats one already found, byte for byte, is run once). A method without any `.pt` file fails.

Threads: a module marked `pytestmark = pytest.mark.threads(n)` runs (with its module fixtures) on n intra-op threads.

Test files import the plain helpers: `from conftest import REPO, compose_cfg` (tests/ is on sys.path under pytest's
default import mode).
"""
from __future__ import annotations

import filecmp
import os
from pathlib import Path

# no test may download: a Hub name that slipped into a test fails at once (subprocesses inherit this) instead of
# reaching for the network; set before huggingface_hub is imported, which reads it once
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from scalegen.build import build_module
from scalegen.tokenizers import MultiScaleVQVAE

REPO = Path(__file__).resolve().parents[1]


def compose_cfg(*overrides: str, config: str = "train", hydra_config: bool = False):
    """`configs/<config>.yaml` with the overrides; `hydra_config` keeps the `hydra` node (launcher settings)."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config, overrides=list(overrides), return_hydra_config=hydra_config)


# ---- tiny stand-ins ------------------------------------------------------------------------------------------------


class LatentsAsImages(torch.nn.Module):
    """A continuous tokenizer whose latent is its input: tests (and goldens) that start from given latents."""

    discrete = False

    def __init__(self, channels: int):
        super().__init__()
        self.latent_channels = channels

    def encode(self, x):
        return x

    def decode(self, x):
        return x


def tiny_module(*overrides: str, num_classes: int = 10):
    """The default training module (VAR on the digits) with a 1-block, 32-wide backbone and random weights."""
    return build_module(compose_cfg("backbone.depth=1", "backbone.width=32", "backbone.num_heads=2", *overrides),
                        num_classes)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A scalegen checkpoint of a randomly initialised tiny VAR (sampling does not care whether it was trained)."""
    torch.manual_seed(0)
    module = tiny_module()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "scalegen_config": module.config}, path)
    return path


def sample_cfg(ckpt: Path, out: Path, **overrides):
    """configs/sample.yaml without Hydra's node, for `ckpt`, writing to `out`, 2 images per class."""
    cfg = OmegaConf.load(REPO / "configs" / "sample.yaml")
    cfg.pop("hydra")
    cfg.merge_with({"ckpt": str(ckpt), "out_dir": str(out), "per_class": 2, **overrides})
    return cfg


def tiny_vq(scales=(1, 2, 4)) -> MultiScaleVQVAE:
    """A multi-scale VQVAE, 8x8 images -> 4x4x8 latent, 32 codes (16x16 -> 8x8 with scales ending in 8); train mode."""
    return MultiScaleVQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, v_patch_nums=scales,
                           using_sa=False, using_mid_sa=False)


# ---- thread counts -------------------------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "threads(n): run the module (and its module fixtures) on n torch intra-op threads")


@pytest.fixture(scope="module", autouse=True)
def _module_threads(request: pytest.FixtureRequest):
    """Parity modules take the count their goldens were made with: CPU reductions (convs, matmuls) sum in an order
    that depends on it, which moves floats by ~1e-5. Other modules take 1: tiny models only lose from more threads
    (and stall on a busy machine)."""
    marker = request.node.get_closest_marker("threads")
    if marker is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(marker.args[0])
    yield
    torch.set_num_threads(before)


# ---- golden files of the official code ----------------------------------------------------------------------------


GOLDEN = REPO / "tests" / "golden"


def parity_dirs() -> list[Path]:
    """tests/golden, then each folder of $SCALEGEN_PARITY_DIR (an extra folder that does not exist is an error)."""
    extra = [Path(p) for p in os.environ.get("SCALEGEN_PARITY_DIR", "").split(os.pathsep) if p]
    missing = [str(p) for p in extra if not p.is_dir()]
    if missing:
        raise pytest.UsageError(f"SCALEGEN_PARITY_DIR: {', '.join(missing)} is not a folder (it lists extra folders "
                                f"of golden files, laid out like {GOLDEN}; unset it to run the repository's goldens)")
    return [GOLDEN, *(p for p in extra if p.resolve() != GOLDEN.resolve())]


def parity_dir(method: str = "") -> Path:
    """The repository's golden folder (of a method): for tests that pick their files by name."""
    return GOLDEN / method if method else GOLDEN


def _golden_params(method: str) -> list:
    params, seen = [], {}
    for root in parity_dirs():
        for path in sorted((root / method).glob("*.pt")):
            twin = seen.get(path.name)
            if twin is not None and filecmp.cmp(twin, path, shallow=False):
                continue  # the same file in two folders: one test
            seen.setdefault(path.name, path)
            params.append(pytest.param(path, id=path.name if twin is None else f"{root.name}-{path.name}"))
    return params or [pytest.param(GOLDEN / method, id=f"{method}-empty")]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("parity")
    if marker is None or "golden_file" not in metafunc.fixturenames:
        return
    if not marker.args:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: use @pytest.mark.parity('<method>') with golden_file")
    metafunc.parametrize("golden_file", _golden_params(marker.args[0]))


@pytest.fixture(scope="session")
def parity_root() -> Path:
    """The parity folder itself (for tests that pick their files by name)."""
    return parity_dir()


@pytest.fixture(scope="module")
def max_diffs(request: pytest.FixtureRequest):
    """(file, quantity) -> (max |ours - golden|, tolerance) of a parity module (see tests/parity.py); printed at the
    end of the module, even without `-s`."""
    table: dict = {}
    yield table
    if not table:
        return
    marker = request.node.get_closest_marker("threads")
    threads = marker.args[0] if marker else torch.get_num_threads()
    method = request.module.__name__.removeprefix("test_parity_")
    fw, qw = (max(len(key[i]) for key in table) + 2 for i in (0, 1))
    lines = ["", f"{method} parity: max |ours - golden| per file and quantity (CPU, float32, "
                 f"{threads} thread{'s' if threads != 1 else ''})"]
    lines += [f"  {f:<{fw}}{q:<{qw}}{d:<12.3g}{tol}" for (f, q), (d, tol) in sorted(table.items())]
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n".join(lines))


PIXEL_FEATURES = 6  # the `pixels` extractor's feature dimension


@pytest.fixture(scope="session")
def pixels():
    """A torch-fidelity feature extractor whose features are the first PIXEL_FEATURES pixel values: known features."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    class Pixels(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)

        @staticmethod
        def get_provided_features_list():
            return ("pixels",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "pixels"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)

        def forward(self, x):
            return (x.flatten(1)[:, :PIXEL_FEATURES].float(),)

    if "test-pixels" not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor("test-pixels", Pixels)
    return "test-pixels"

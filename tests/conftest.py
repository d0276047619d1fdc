"""Where the golden files of the official code live, and how a parity test gets one of them.

The folder is `$SCALEGEN_PARITY_DIR`, else `../shared/parity` beside the repository (resolved from this file, not
from the working directory). A test marked `@pytest.mark.parity("<method>")` that takes a `golden_file` argument
runs once per `.pt` file in `<parity dir>/<method>/` found at collection, with the file name as its id. Without
the folder the test is skipped, saying why; a folder without any `.pt` file fails.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def parity_dir(method: str = "") -> Path:
    root = Path(os.environ.get("SCALEGEN_PARITY_DIR") or REPO_ROOT.parent / "shared" / "parity")
    return root / method if method else root


def _golden_params(method: str) -> list:
    folder = parity_dir(method)
    if not folder.is_dir():
        reason = f"no golden files: {folder} does not exist (set SCALEGEN_PARITY_DIR to the shared/parity folder)"
        return [pytest.param(None, id=f"{method}-missing", marks=pytest.mark.skip(reason=reason))]
    files = sorted(folder.glob("*.pt"))
    return [pytest.param(path, id=path.name) for path in files] or [pytest.param(folder, id=f"{method}-empty")]


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

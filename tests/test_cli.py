"""The installed commands: `[project.scripts]` names an importable entry point for each, `--help` of the Hydra
commands lists the config groups, and (when the package is installed with its scripts) each script runs."""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from scalegen.commands import cli

SCRIPTS = {"scalegen-train", "scalegen-sample", "scalegen-report", "scalegen-convert"}


def scripts_table() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_names_an_importable_entry_point():
    table = scripts_table()
    assert set(table) == SCRIPTS
    for name, target in table.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_configs_are_found_from_the_package():
    assert cli.CONFIGS == REPO / "configs"


@pytest.fixture
def fresh_hydra():
    """An in-process Hydra main leaves its config as the process's HydraConfig: clear it for the tests after."""
    yield
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("main,groups", [(cli.train_main, ["model:", "experiment:", "data:", "tokenizer:"]),
                                         (cli.sample_main, ["Configuration groups"])])
def test_hydra_help_lists_the_config_groups(main, groups, monkeypatch, capsys, tmp_path, fresh_hydra):
    monkeypatch.chdir(tmp_path)  # the configs come from the package, not the working directory
    monkeypatch.setattr(sys, "argv", ["scalegen", "--help"])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None)
    out = capsys.readouterr().out
    assert "== Configuration groups ==" in out
    for group in groups:
        assert group in out


@pytest.mark.parametrize("main", [cli.report_main, cli.convert_main])
def test_argparse_commands_help(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_installed_script_runs(name, tmp_path):
    script = Path(sys.executable).parent / name
    if not script.exists():
        script = shutil.which(name)
    if not script:
        pytest.skip(f"{name} is not installed (pip install -e . installs it)")
    proc = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if name in ("scalegen-train", "scalegen-sample"):
        assert "== Configuration groups ==" in proc.stdout

"""Sharded checkpoint folders: torch unpickles `.metadata` with plain pickle, so every path that reads one (the
consolidation command, the FSDP2 / FSDP1 resume) vets it with a restricted unpickler first; a planted payload is
refused by name and never runs, while genuine metadata still reads."""
from __future__ import annotations

import pickle
import warnings

import pytest
import torch

from scalegen.scaleout.consolidate import consolidate
from scalegen.scaleout.dcp_metadata import UnsafeCheckpoint, check_sharded_folder
from scalegen.scaleout.distributed import FSDP1Strategy, FSDP2Strategy


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")  # creates the marker file when unpickled


def planted(tmp_path, name=".metadata"):
    folder, marker = tmp_path / "last.ckpt", tmp_path / "PWNED"
    folder.mkdir()
    (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    torch.save({"global_step": 4}, folder / "meta.pt")
    return folder, marker


def test_the_payload_would_run_under_plain_pickle(tmp_path):
    folder, marker = planted(tmp_path)
    pickle.loads((folder / ".metadata").read_bytes()).close()
    assert marker.exists()  # what torch's FileSystemReader.read_metadata would do


def test_consolidate_refuses_a_planted_metadata(tmp_path):
    folder, marker = planted(tmp_path)
    with pytest.raises(UnsafeCheckpoint, match=r"asks for io\.open"):
        consolidate(folder, tmp_path / "full.ckpt")
    assert not marker.exists() and not (tmp_path / "full.ckpt").exists()


@pytest.mark.parametrize("strategy", [FSDP2Strategy, FSDP1Strategy], ids=["fsdp2", "fsdp1"])
def test_sharded_resume_refuses_a_planted_metadata(tmp_path, strategy):
    folder, marker = planted(tmp_path, "__0.metadata")
    (folder / ".metadata").write_bytes((folder / "__0.metadata").read_bytes())
    with pytest.raises(UnsafeCheckpoint, match="refused to load"):
        strategy().load_checkpoint(folder)
    assert not marker.exists()


def test_genuine_metadata_reads(tmp_path):
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"w": torch.zeros(3, dtype=torch.bfloat16), "o": {"s": torch.ones(2, 2)}, "n": 3},
                 checkpoint_id=tmp_path / "ok")
    check_sharded_folder(tmp_path / "ok")


def test_garbage_metadata_is_not_a_checkpoint(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / ".metadata").write_text("hello")
    with pytest.raises(UnsafeCheckpoint, match="not a torch distributed checkpoint"):
        check_sharded_folder(tmp_path / "f")

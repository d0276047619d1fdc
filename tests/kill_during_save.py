"""Run train.py, SIGKILLing the process in the middle of its 2nd write of checkpoints/last.ckpt (tests/test_resume.py).

    python tests/kill_during_save.py [train.py overrides...]

torch.save of the temporary file that AtomicCheckpointIO renames onto last.ckpt writes a few bytes, then the
process kills itself: what a power cut or an OOM kill during the save leaves behind.
"""
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
_save = torch.save
_saves = []


def save_then_die(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and Path(f).name.startswith(".last.ckpt.") and len(_saves) == 1:
        with open(f, "wb") as half:
            half.write(b"PK\x03\x04 half a checkpoint")
            half.flush()
            os.fsync(half.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    if isinstance(f, (str, os.PathLike)) and Path(f).name.startswith(".last.ckpt."):
        _saves.append(f)
    return _save(obj, f, *args, **kwargs)


torch.save = save_then_die
sys.argv = [str(REPO / "train.py"), *sys.argv[1:]]
runpy.run_path(str(REPO / "train.py"), run_name="__main__")

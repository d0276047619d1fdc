"""Options and inputs checked before any compute, naming the key and the allowed range; files that are not what
they are given as say so; 16-bit PNGs decode to the right 8-bit values."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from scalegen.data.imagefolder import ImageFiles


def test_16bit_png_is_scaled_not_saturated(tmp_path):
    wide = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(wide).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    image, _ = ImageFiles([(str(tmp_path / "g16.png"), 0)], transforms.PILToTensor())[0]
    expected = torch.from_numpy(np.rint(wide / 257.0).astype(np.uint8))
    assert image.shape == (3, 32, 32) and all(torch.equal(image[c], expected) for c in range(3))

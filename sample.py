"""Generate images from a checkpoint: PNGs, a grid, and an .npz (arr_0, uint8 NHWC) for the ADM evaluator
(the installed command `scalegen-sample` is the same entry point)."""
from scalegen.commands.cli import sample_main

if __name__ == "__main__":
    sample_main()

"""Generate images from a checkpoint: PNGs, a grid, and an .npz (arr_0, uint8 NHWC) for the ADM evaluator."""
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from scalegen.commands.sample import sample_to_folder

    sample_to_folder(cfg)


if __name__ == "__main__":
    main()

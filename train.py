"""Train a generator (default) or a tokenizer. `python train.py --help` lists the config groups."""
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from scalegen.commands.train import train  # imported here so `--help` and config errors come before the heavy imports

    train(cfg)


if __name__ == "__main__":
    main()

"""Train a generator (default) or a tokenizer. `python train.py --help` lists the config groups (the installed
command `scalegen-train` is the same entry point)."""
from scalegen.commands.cli import train_main

if __name__ == "__main__":
    train_main()

"""Training a generator: the LightningModule (module.py) and the optimizer pieces (optim.py)."""

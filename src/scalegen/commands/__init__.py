"""What the entry points run: train.py (train.py at the repository root) and sample.py (sample.py)."""

"""Evaluation: torch-fidelity metrics offline (metrics.py), the digits classifier (classifier.py), the training
callback (callback.py) and the comparison report (report.py, `python -m scalegen.eval.report <multirun dir>`)."""

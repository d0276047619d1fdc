"""What a newcomer sees in a run's console: the progress bar names the step budget, the EMA copy is in eval mode."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import tiny_module

from scalegen.training.progress import StepProgressBar

pytestmark = pytest.mark.threads(1)


@pytest.mark.parametrize("max_steps, max_epochs, want", [
    (500, -1, "Epoch 3 · to step 500"),  # step-limited: Lightning's own text would be "Epoch 3/-2"
    (-1, 10, "Epoch 3/9"),  # epoch-limited: Lightning's text
])
def test_progress_bar_describes_the_budget(max_steps, max_epochs, want):
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=max_steps, max_epochs=max_epochs)
    assert bar._get_train_description(3).rstrip() == want  # Lightning pads its own text to the validation bar's


def test_the_ema_copy_is_never_in_train_mode():
    module = tiny_module()
    assert module.ema is not None and not module.ema.training
    module.train()
    assert module.generator.training and not module.ema.training and not module.tokenizer.training

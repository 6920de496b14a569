"""eval_mode gives a module back in the mode it found it in, also when the block raises."""

from __future__ import annotations

import pytest
from torch import nn

from hsft.model.modes import eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_the_block_runs_in_eval_mode_and_the_mode_comes_back(training):
    module = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(training)
    with eval_mode(module) as inside:
        assert inside is module and not module.training and not module[1].training
    assert module.training is training and module[1].training is training
    with pytest.raises(RuntimeError), eval_mode(module):
        raise RuntimeError("inside")
    assert module.training is training

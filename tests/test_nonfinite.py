"""Non-finite values in training: a NaN in one sample's image and a NaN gradient each skip their step and
name the samples; repeated non-finite steps stop the stage without saving the unfinished epoch, so
--resume continues from the last good epoch boundary and reproduces a clean run from there."""

from __future__ import annotations

import pytest
import torch

from hsft.config import HSFTStageConfig, TrainConfig
from hsft.data import make_fundus
from hsft.engine import checkpoint
from hsft.engine.loop import NonFiniteTrainingError, train
from hsft.engine.tensorboard import TBWriter
from hsft.stages.hsft import HSFTTask
from hsft.stages.training import Validation

from toy_training import ToyModule, ToyTask, run


class PoisonedImageTask(HSFTTask):
    """HSFT whose micro-batches carry a NaN pixel in the image of one chosen sample."""

    poisoned_id = ""

    def make_batch(self, indices, dtype, device):
        batch = super().make_batch(indices, dtype, device)
        for row, index in enumerate(indices):
            if self.samples[index].id == self.poisoned_id:
                batch.images.sam_pixels[row, 0, 0, 0] = float("nan")
        return batch


def test_nan_in_one_samples_image_skips_its_step_and_names_it(tmp_path, capsys, make_context, tiny_model):
    samples = [make_fundus(seed=300 + i, size=64) for i in range(4)]
    model = tiny_model
    task = PoisonedImageTask(model, samples, HSFTStageConfig(cache_features=False), Validation([], 1, 1))
    task.poisoned_id = samples[2].id
    cfg = TrainConfig(epochs=1, micro_batch=1, grad_accum=1, lr=1e-3)
    result = train(task, cfg, make_context(), stage_dir=tmp_path, tb=TBWriter(tmp_path / "tb"))
    assert result.optimizer_steps == 4 and result.skipped_steps == 1
    assert [entry["samples"] for entry in result.skipped] == [[samples[2].id]]
    assert result.skipped[0]["reason"] == "non-finite loss"
    out = capsys.readouterr().out
    assert f"skipped: non-finite loss in the micro-batch of sample(s) {samples[2].id}" in out
    assert all(torch.isfinite(p).all() for p in result.engine.module.parameters())


class NaNGradientModule(ToyModule):
    """A finite loss whose gradient turns NaN on its way back for the chosen samples."""

    def __init__(self, poisoned: set[int]):
        super().__init__()
        self.poisoned = poisoned

    def forward(self, batch):
        x, y, ids = batch
        prediction = self.linear(x).squeeze(-1)
        if any(i in self.poisoned for i in ids):
            prediction.register_hook(lambda grad: grad * float("nan"))
        loss = ((prediction - y).float() ** 2).mean()
        return loss, {"mse": loss.detach()}


def test_nan_gradient_skips_the_window_and_names_its_samples(tmp_path, capsys):
    task = ToyTask()
    task.module = NaNGradientModule({6})
    cfg = TrainConfig(epochs=1, micro_batch=2, grad_accum=2, lr=0.01)
    result, _ = run(tmp_path, cfg, task=task)
    assert result.skipped_steps == 1 and result.optimizer_steps == 4
    entry = result.skipped[0]
    assert entry["reason"] == "non-finite gradient" and "#6" in entry["samples"] and len(entry["samples"]) == 4
    assert all(torch.isfinite(p).all() for p in result.engine.module.parameters())
    assert "skipped: non-finite gradient in the accumulation window of sample(s)" in capsys.readouterr().out


class PoisonAfterFirstEpoch(ToyTask):
    """Every sample turns non-finite once the first epoch has ended (its evaluation switches it on)."""

    def __init__(self, poison_later: bool):
        super().__init__()
        self.poison_later = poison_later

    def evaluate(self, module):
        metrics = super().evaluate(module)
        if self.poison_later:
            self.module.poison = set(range(len(self)))
        return metrics


def test_repeated_nan_stops_at_the_last_good_epoch_and_resume_does_not_replay_it(tmp_path):
    cfg = TrainConfig(epochs=2, micro_batch=2, grad_accum=1, lr=0.02, max_nonfinite_steps=2)
    clean, _ = run(tmp_path / "clean", cfg, task=PoisonAfterFirstEpoch(poison_later=False))
    with pytest.raises(NonFiniteTrainingError) as info:
        run(tmp_path / "bad", cfg, task=PoisonAfterFirstEpoch(poison_later=True))
    ckpts = tmp_path / "bad" / "checkpoints"
    message = str(info.value)
    assert "the unfinished epoch was not saved" in message and str(ckpts / "epoch0001") in message
    assert "samples #" in message
    # The mid-epoch state is nowhere: COMPLETE still names the epoch boundary, and nothing else was written.
    assert checkpoint.latest_tag(ckpts) == "epoch0001"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["epoch0001"]
    # Once the data is fixed, --resume continues from the boundary and takes the clean run's steps.
    resumed, _ = run(tmp_path / "bad", cfg, task=PoisonAfterFirstEpoch(poison_later=False), resume=True)
    assert resumed.resumed_from.endswith("epoch0001")
    # Its record: the first epoch's steps from the checkpoint, then the clean run's; the unsaved epoch's are gone.
    assert resumed.losses == clean.losses and resumed.skipped == []
    assert torch.equal(resumed.engine.module.linear.weight, clean.engine.module.linear.weight)

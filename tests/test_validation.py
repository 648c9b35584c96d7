"""Validation loss: one value for one model, whatever the number of processes and the micro-batch size."""

from __future__ import annotations

import torch

from model.edm import edm_loss
from tests.fake_world import ThreadWorld
from tests.test_data import load
from tests.test_model import randomize_zero_layers, tiny
from trainer.training.validate import validation_loss


def test_validation_loss_is_the_same_on_one_and_two_processes() -> None:
    val = load("digits").val
    assert val is not None and len(val) % 2 == 1  # one rank gets an image more than the other
    model = tiny()
    randomize_zero_layers(model)

    def loss(images: torch.Tensor, labels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        return edm_loss(model, images, labels, num_classes=10, label_dropout=0.1, generator=generators)

    def on(world_size: int, micro_batch: int, seed: int = 0) -> list[float | None]:
        world = ThreadWorld(world_size)
        return world.run(lambda rank: validation_loss(model, val, loss, topo=world.topology(rank),
                                                      micro_batch=micro_batch, seed=seed))  # fmt: skip

    one = on(1, 64)
    two = on(2, 16)
    assert one[0] is not None and two[0] == two[1]
    torch.testing.assert_close(two[0], one[0], rtol=1e-5, atol=0)
    assert on(1, 64, seed=1)[0] != one[0]  # the run's seed chooses the noise

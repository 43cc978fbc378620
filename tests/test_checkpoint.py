"""A checkpoint is restored onto the rank's own device: every ``torch.load`` of it names
the device of the module's parameters (without it, each rank of a node would first load
rank 0's saved optimizer state onto GPU 0), and the optimizer state ends up there."""

from __future__ import annotations

import torch

from rzenembed.training import loop


class _Module(torch.nn.Module):
    """What ``restore_checkpoint`` asks of the training module."""

    def __init__(self):
        super().__init__()
        self.lora = torch.nn.Linear(4, 3)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.named_parameters()}


class _Sampler:
    def __init__(self):
        self.state = None

    def load_state_dict(self, state):
        self.state = state


def _optimizer(module):
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler


def test_restore_loads_onto_the_modules_device_and_continues_after_the_saved_step(
    tmp_path, monkeypatch
):
    torch.manual_seed(0)
    saved = _Module()
    optimizer, scheduler = _optimizer(saved)
    saved.lora(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    loop.save_checkpoint(tmp_path, saved, optimizer, scheduler, {"cursor": 7}, step=11)

    loads = []
    real_load = torch.load

    def spy(path, *args, **kwargs):
        loads.append(kwargs.get("map_location"))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    restored, sampler = _Module(), _Sampler()
    optimizer2, scheduler2 = _optimizer(restored)
    next_step = loop.restore_checkpoint(tmp_path, restored, optimizer2, scheduler2, sampler)

    device = next(restored.parameters()).device
    assert loads == [device, device]
    assert next_step == 12 and sampler.state == {"cursor": 7}
    for a, b in zip(saved.parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b)
    for state in optimizer2.state.values():
        assert state["exp_avg"].device == device and state["exp_avg_sq"].device == device
    assert torch.equal(
        optimizer2.state[next(restored.parameters())]["exp_avg"],
        optimizer.state[next(saved.parameters())]["exp_avg"],
    )

"""The trainers' shared pieces: the warmup-cosine schedule and the checkpoint files."""
from __future__ import annotations

import math
import pickle

import pytest
import torch

from fastvlm_kernels.imitation.checkpoint import load_checkpoint, save_checkpoint, write_json
from fastvlm_kernels.imitation.schedule import WarmupCosine


@pytest.mark.parametrize("warmup,total,min_ratio", [(0, 10, 0.0), (1, 2, 0.5), (5, 30, 0.1), (100, 3000, 0.1)],
                         ids=lambda value: str(value))
def test_warmup_then_cosine_to_the_floor(warmup, total, min_ratio):
    schedule = WarmupCosine(warmup, total, min_ratio)
    for step in range(warmup):
        assert schedule(step) == pytest.approx((step + 1) / warmup)
    assert schedule(warmup) == pytest.approx(1.0)
    middle = warmup + (total - warmup) / 2
    if middle == int(middle):
        assert schedule(int(middle)) == pytest.approx((1 + min_ratio) / 2)
    assert schedule(total) == pytest.approx(min_ratio)
    assert schedule(total + 50) == pytest.approx(min_ratio)
    values = [schedule(step) for step in range(warmup, total + 1)]
    assert all(later <= earlier for earlier, later in zip(values, values[1:]))


@pytest.mark.parametrize("peak", [2e-3, 1e-3, 3e-4])
def test_rate_is_the_peak_times_the_multiplier(peak):
    """Within an ulp everywhere; in the warmup rounded as ``peak * (step + 1) / warmup``, as the tiny VLM's
    build always computed it (at some steps that differs from ``peak * multiplier`` in the last bit)."""
    schedule = WarmupCosine(100, 3000, 0.1)
    last_bit_apart = 0
    for step in range(3000):
        rate = schedule.rate(peak, step)
        assert math.isclose(rate, peak * schedule(step), rel_tol=4e-16), step
        last_bit_apart += rate != peak * schedule(step)
        if step < 100:
            assert rate == peak * (step + 1) / 100
    assert last_bit_apart > 0      # the two roundings are distinct: the exact check above has something to hold


def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 7, "log": [{"loss": 0.5}],
             "config": {"name": "x", "flag": True, "ratio": None}, "rng": torch.get_rng_state()}
    save_checkpoint(path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["log"] == [{"loss": 0.5}] and loaded["config"] == state["config"]
    assert all(torch.equal(loaded["model"][name], value) for name, value in model.state_dict().items())
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    restored.load_state_dict(loaded["optimizer"])
    assert restored.param_groups[0]["betas"] == (0.9, 0.98)
    assert torch.equal(loaded["rng"], state["rng"])


class _Arbitrary:
    pass


def test_a_checkpoint_holding_an_arbitrary_object_is_refused(tmp_path):
    """Loading never unpickles code: a file holding an instance of some class fails to load."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "object": _Arbitrary()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)


def test_write_json_replaces_the_file(tmp_path):
    path = tmp_path / "index.json"
    write_json(path, {"a": 1})
    write_json(path, {"b": [1, 2]})
    assert path.read_text() == '{\n  "b": [\n    1,\n    2\n  ]\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]

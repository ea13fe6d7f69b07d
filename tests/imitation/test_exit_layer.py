"""pick-exit-layer's verdict: the fastest of every measured configuration, plain early exit included."""
from __future__ import annotations

import pytest

from fastvlm_kernels.imitation.exit_layer import ExitLayerReport, fastest, format_table


def _report(exit_layer: int, seconds_early_exit: float, seconds_imitation: float) -> ExitLayerReport:
    return ExitLayerReport(exit_layer=exit_layer, accepted_early_exit=1.0, accepted_imitation=2.0,
                           seconds_generate=10.0, seconds_early_exit=seconds_early_exit,
                           seconds_imitation=seconds_imitation, identical=True)


@pytest.mark.parametrize("times, layer, drafter, speedup", [
    # plain early exit at layer 2 (10 / 4 = 2.5x) beats every network (best 10 / 5 = 2.0x)
    ([(1, 8.0, 6.0), (2, 4.0, 5.0)], 2, "plain early exit", 2.5),
    # the network at layer 1 beats plain early exit everywhere
    ([(1, 8.0, 2.5), (2, 4.0, 5.0)], 1, "imitation network", 4.0),
    # a tie within a layer goes to plain early exit (no network to ship)
    ([(3, 5.0, 5.0)], 3, "plain early exit", 2.0),
], ids=["early-exit", "network", "tie"])
def test_the_fastest_configuration_of_all(times, layer, drafter, speedup):
    reports = [_report(*entry) for entry in times]
    best, chosen, measured = fastest(reports)
    assert (best.exit_layer, chosen, measured) == (layer, drafter, pytest.approx(speedup))
    wording = "its imitation network" if drafter == "imitation network" else "plain early exit"
    assert format_table(reports, 4).endswith(f"Fastest: exit layer {layer} ({speedup:.2f}x with {wording}).")


def test_nothing_measured_is_an_error():
    with pytest.raises(ValueError, match="no exit layer was measured"):
        fastest([])

"""Equality of two trainings at a tolerance their own signal can violate.

Two runs that should agree (1 rank against 2, fp16 against fp32, one option against another) are compared
on their updates θ_after − θ_before, not on the weights: the weights agree to the tolerance even when one run
never trained. Each tensor's tolerance is a fraction `rel` of its reference update (plus a few float32 ulps
of its weights, the resolution at which θ_after − θ_before is known), and the update itself must be at least
`min_margin` tolerances large, so that a run that does not update, updates with the wrong sign or by the
wrong amount is far outside it. Every test that uses this also shows that such a mutant fails it.
"""

from __future__ import annotations

import dataclasses

import torch

ULPS = 4  # θ_after − θ_before of float32 weights is known to a few ulps of θ.
REL_TWO_RANKS = 1e-3  # Tolerance on each tensor's update, 1 rank against 2, relative to its size: summation order.


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How two updates compared: the smallest margin (reference update ÷ tolerance) over the tensors and its
    tensor, and the largest error in tolerances (≤ 1 when they agree) and its tensor."""

    margin: float
    error: float
    margin_key: str = ""
    error_key: str = ""


def float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [key for key, value in state.items() if value.is_floating_point()]


def compare_updates(after: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                    before: dict[str, torch.Tensor], rel: float, keys: list[str] | None = None) -> Agreement:
    """The margin and the error of the update after − before against reference − before, per tensor, at the
    tolerance rel · max|reference − before| + ULPS · eps · max|before|; tensors the reference leaves
    unchanged (buffers) must stay unchanged."""
    eps = torch.finfo(torch.float32).eps
    margin, error, margin_key, error_key = float("inf"), 0.0, "", ""
    for key in float_keys(before) if keys is None else keys:
        start = before[key].double()
        expected, actual = reference[key].double() - start, after[key].double() - start
        size = expected.abs().max().item()
        if size == 0:  # e.g. a buffer: must not move either
            if not torch.equal(actual, expected):
                error, error_key = float("inf"), key
            continue
        tolerance = rel * size + ULPS * eps * start.abs().max().item()
        if size / tolerance < margin:
            margin, margin_key = size / tolerance, key
        if (actual - expected).abs().max().item() / tolerance > error:
            error, error_key = (actual - expected).abs().max().item() / tolerance, key
    return Agreement(margin, error, margin_key, error_key)


def assert_same_update(after: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                       before: dict[str, torch.Tensor], rel: float, min_margin: float = 100.0,
                       keys: list[str] | None = None) -> Agreement:
    """Assert that `after` updated `before` as `reference` did, within `rel` of each tensor's update, and that
    each update is at least `min_margin` tolerances large (the test can see a missing update)."""
    agreement = compare_updates(after, reference, before, rel, keys)
    assert agreement.margin >= min_margin, (
        f"the reference update of {agreement.margin_key} is only {agreement.margin:.3g}× the tolerance (need "
        f"{min_margin}): a run that "
        f"did not train would pass; train longer or with a larger learning rate")
    assert agreement.error <= 1.0, (f"the updates of {agreement.error_key} differ by {agreement.error:.3g}× the "
                                    f"tolerance (rel={rel})")
    return agreement


def mutants(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Broken variants of the update after − before: none at all, the wrong sign, twice the size (a sum where a
    mean belongs, e.g. gradients summed over two ranks), half of it."""
    def scaled(factor: float) -> dict[str, torch.Tensor]:
        return {key: before[key] + factor * (after[key] - before[key]) if value.is_floating_point() else value
                for key, value in after.items()}
    return {"no update": scaled(0.0), "wrong sign": scaled(-1.0), "doubled": scaled(2.0), "halved": scaled(0.5)}


def assert_mutants_fail(after: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                        before: dict[str, torch.Tensor], rel: float, min_margin: float = 100.0,
                        keys: list[str] | None = None) -> dict[str, float]:
    """Each mutant of `after` fails `assert_same_update`; returns each mutant's error in tolerances."""
    errors = {}
    for name, mutant in mutants(after, before).items():
        errors[name] = compare_updates(mutant, reference, before, rel, keys).error
        try:
            assert_same_update(mutant, reference, before, rel, min_margin, keys)
        except AssertionError:
            continue
        raise AssertionError(f"the mutant '{name}' passes the equality check: the check is vacuous")
    return errors


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bitwise equality of two training states' weights, EMAs and optimizer moments (an exact resume)."""
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for rate in a["ema"]:
        for key in a["ema"][rate]:
            assert torch.equal(a["ema"][rate][key], b["ema"][rate][key]), (rate, key)
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][key])), key

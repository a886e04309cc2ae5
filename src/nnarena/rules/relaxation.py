"""The one relaxation loop shared by the energy-based rules (predictive coding, equilibrium
propagation): gradient steps on state variables, weights held fixed, graphs freed every step.

``relax`` runs ``s <- s - step_size * dE/ds`` for ``steps`` steps (optionally projecting the
states back onto their domain), stopping early once no state moves by more than ``tol``. ``E``
is summed over the batch, so each example relaxes on its own and the step size does not depend
on the batch size. The same autograd call can also return ``dE/dθ`` for given parameters at the
current (pre-update) states, which incremental predictive coding uses at every inference step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["relax"]

Energy = Callable[[list[torch.Tensor]], torch.Tensor]


def relax(
    states: Sequence[torch.Tensor],
    energy: Energy,
    steps: int,
    step_size: float,
    tol: float | None = None,
    params: Sequence[torch.Tensor] = (),
    on_params: Callable[[list[torch.Tensor | None]], None] | None = None,
    project: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> tuple[list[torch.Tensor], int]:
    """Descend ``energy`` in ``states`` (the weights inside ``energy`` stay fixed).

    Args:
        states: initial state tensors (copied, never modified).
        energy: ``states -> scalar`` (summed over the batch); only its gradient in the states is
            used, so a pseudo-energy whose state gradient is a vector field works too.
        steps: the most steps taken.
        step_size: the gradient step on the states.
        tol: stop once the largest absolute state change of a step is below this.
        params: tensors whose energy gradient, at each step's states before the update, is passed
            to ``on_params`` (``None`` where the energy does not depend on one).
        on_params: receives those gradients once per step.
        project: maps the states after each step back onto their domain (e.g. a box).

    Returns:
        The final states (detached) and the number of steps taken.
    """
    current = [s.detach() for s in states]
    params = list(params)
    for step in range(steps):
        with torch.enable_grad():
            leaves = [s.detach().requires_grad_() for s in current]
            grads = torch.autograd.grad(energy(leaves), leaves + params, allow_unused=True)
        if on_params is not None:
            on_params(list(grads[len(leaves):]))
        previous = current
        current = [s if g is None else s - step_size * g
                   for s, g in zip(current, grads[: len(leaves)], strict=True)]
        if project is not None:
            current = project(current)
        if tol is not None and max((c - p).abs().max().item()
                                   for c, p in zip(current, previous, strict=True)) < tol:
            return current, step + 1
    return current, steps

"""A binary associative memory grown by Hebbian consolidation of noisy inputs under a budget.

Memory ``hebbian-memory`` ("Robust Associative Memories Naturally Occuring From Recurrent Hebbian
Networks Under Noise", Coyac, Gripon, Langlais and Berrou, 2017, arXiv 1709.08367). A recurrent
network of ``n`` binary neurons receives a stream of noisy sparse binary inputs (patterns with
some active neurons erased and some spurious ones inserted). Every presentation strengthens the
trace of each pair of co-active neurons by one (Hebbian); the energy limit keeps only the
``budget`` strongest traces as active binary synapses (consolidation). Pairs within a pattern
co-occur on most of its presentations, noise pairs rarely, so the consolidated synapses are the
patterns' cliques: the Willshaw / clique memory of the clean patterns, which `willshaw` builds
directly. Retrieval is the recurrent dynamics of those memories: each neuron sums its active
synapses from the active neurons plus its own activity, the neurons with the highest sum stay
active (global winners-take-all), repeated a few times.

This is not a classifier and not a `LearningRule`: it is registered in the ``memory`` family.
Deviation: consolidation is applied once after the stream (the ``budget`` strongest traces),
which is where the paper's incremental consolidation ends up for a stationary stream; no
synapse decay is modelled.
"""

from __future__ import annotations

import torch

from nnarena.errors import ConfigError
from nnarena.registry import register

__all__ = ["HebbianMemory", "retrieve", "willshaw"]


def willshaw(patterns: torch.Tensor) -> torch.Tensor:
    """The binary Willshaw / clique memory of ``patterns`` (``(m, n)`` 0/1): one synapse for
    every pair of neurons active together in some pattern, no self-connections."""
    p = patterns.float()
    w = (p.t() @ p) > 0
    w.fill_diagonal_(False)
    return w


def retrieve(weights: torch.Tensor, cues: torch.Tensor, iterations: int = 4) -> torch.Tensor:
    """Complete ``cues`` (``(b, n)`` 0/1) with binary ``weights`` by global winners-take-all.

    Each step a neuron scores its active synapses from active neurons plus one for its own
    activity; the neurons reaching the row's highest score are the new state.
    """
    state = cues.bool()
    w = weights.float()
    for _ in range(iterations):
        score = state.float() @ w + state.float()
        best = score.max(dim=1, keepdim=True).values
        state = (score >= best) & (best > 0)
    return state


@register("memory", "hebbian-memory",
          paper="Robust Associative Memories Naturally Occuring From Recurrent Hebbian Networks "
                "Under Noise",
          summary="Binary recurrent memory grown by Hebbian consolidation of noisy inputs under "
                  "a synapse budget.")
class HebbianMemory:
    """Recurrent binary memory whose synapses form by Hebbian consolidation under a budget.

    Args:
        n_neurons: neurons in the network.
        budget: most active (binary, undirected) synapses the network may keep.
        iterations: retrieval steps.

    Raises:
        ConfigError: a non-positive size, budget or iteration count.
    """

    def __init__(self, n_neurons: int, budget: int, iterations: int = 4) -> None:
        for name, value in (("n_neurons", n_neurons), ("budget", budget),
                            ("iterations", iterations)):
            if value < 1:
                raise ConfigError(f"memory 'hebbian-memory' {name} must be >= 1, got {value}")
        self.n_neurons, self.budget, self.iterations = n_neurons, budget, iterations
        self.traces = torch.zeros(n_neurons, n_neurons)
        self.weights = torch.zeros(n_neurons, n_neurons, dtype=torch.bool)

    def fit(self, inputs: torch.Tensor) -> HebbianMemory:
        """Present a stream of noisy binary inputs (``(t, n)`` 0/1) and consolidate.

        Raises:
            ConfigError: ``inputs`` does not have ``n_neurons`` columns.
        """
        if inputs.dim() != 2 or inputs.shape[1] != self.n_neurons:
            raise ConfigError(f"memory 'hebbian-memory' expects inputs of shape (t, "
                              f"{self.n_neurons}), got {tuple(inputs.shape)}")
        p = inputs.float()
        self.traces += p.t() @ p  # one Hebbian increment per co-activation
        self.traces.fill_diagonal_(0)
        upper = torch.triu(self.traces, diagonal=1)
        strongest = upper.flatten().topk(min(self.budget, upper.numel())).indices
        keep = torch.zeros(upper.numel(), dtype=torch.bool)
        keep[strongest] = True
        keep &= upper.flatten() > 0
        upper_w = keep.view_as(upper)
        self.weights = upper_w | upper_w.t()
        return self

    def retrieve(self, cues: torch.Tensor) -> torch.Tensor:
        """Complete partially erased patterns (``(b, n)`` 0/1) with the consolidated synapses."""
        return retrieve(self.weights, cues, self.iterations)

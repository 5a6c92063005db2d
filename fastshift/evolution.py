"""The evolutionary searcher of SPOS / Supernet Shifting, with explicit randomness and state.

Generation 0 is ``population`` random legal architectures. Every later generation is proposed
from the current top-``top_k`` (ranked by each architecture's latest error):
``mutations`` mutants (parent uniform from the top-k, each gene resampled with probability
``mutation_prob``), then ``crossovers`` children (two parents from the top-k, each gene from
either), each with at most 10x attempts, then random architectures up to ``population``.
An architecture appears at most once per generation; one proposed again in a later generation
is evaluated again (Supernet Shifting re-scores repeats on the drifted weights). Legal means
within the FLOPs / params limits.

Proposals never depend on the errors of the generation being proposed, so a whole generation is
proposed first (:meth:`propose`) and evaluated afterwards (:meth:`record`, :meth:`rank`): the
same decisions as the released interleaved loop, in a form that can be batched and resumed.
"""

from __future__ import annotations

import numpy as np

from .space import Arch, SearchSpace

__all__ = ["EvolutionSearcher"]


class EvolutionSearcher:
    """Args (keyword-only): population, top_k, mutations, mutation_prob, crossovers,
    generations (evolved after generation 0), flops_limit, params_limit, num_classes (for the
    cost of the classifier), seed, max_random_tries (attempts allowed for the random fill of one
    generation before an error)."""

    def __init__(self, space: SearchSpace, *, population: int = 50, top_k: int = 10,
                 mutations: int = 25, mutation_prob: float = 0.1, crossovers: int = 25,
                 generations: int = 20, flops_limit: float | None = None,
                 params_limit: float | None = None, num_classes: int | None = None,
                 seed: int = 0, max_random_tries: int | None = None):
        for name, value in (("population", population), ("top_k", top_k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("mutations", mutations), ("crossovers", crossovers),
                            ("generations", generations)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not 0.0 <= mutation_prob <= 1.0:
            raise ValueError(f"mutation_prob must be in [0, 1], got {mutation_prob!r}")
        if top_k > population:
            raise ValueError(f"top_k ({top_k}) cannot exceed population ({population})")
        self.space = space
        self.population = population
        self.top_k = top_k
        self.mutations = mutations
        self.mutation_prob = float(mutation_prob)
        self.crossovers = crossovers
        self.generations = generations
        self.flops_limit = flops_limit
        self.params_limit = params_limit
        self.num_classes = num_classes
        self.max_random_tries = max_random_tries or 1000 * population
        self.rng = np.random.default_rng(seed)
        self.generation = 0
        self.latest: dict[Arch, dict] = {}  # arch -> latest fitness record
        self.top: list[Arch] = []
        self._cost: dict[Arch, tuple[int, int]] = {}
        self._check_feasible()

    # -- constraints ------------------------------------------------------------------------
    def cost(self, arch: Arch) -> tuple[int, int]:
        """(FLOPs, params) of ``arch``, cached."""
        if arch not in self._cost:
            self._cost[arch] = (self.space.flops(arch, self.num_classes),
                                self.space.params(arch, self.num_classes))
        return self._cost[arch]

    def is_legal(self, arch: Arch) -> bool:
        flops, params = self.cost(arch)
        return ((self.flops_limit is None or flops <= self.flops_limit)
                and (self.params_limit is None or params <= self.params_limit))

    def _check_feasible(self):
        """Fail before any work when no architecture (or fewer than a population) is legal."""
        lo_f, hi_f = self.space.flops_range(self.num_classes)
        lo_p, hi_p = self.space.params_range(self.num_classes)
        if self.flops_limit is not None and self.flops_limit < lo_f:
            raise ValueError(
                f"flops_limit {self.flops_limit:.6g} is below the smallest architecture of the "
                f"space ({lo_f} FLOPs; the space spans {lo_f}..{hi_f}): no legal architecture"
            )
        if self.params_limit is not None and self.params_limit < lo_p:
            raise ValueError(
                f"params_limit {self.params_limit:.6g} is below the smallest architecture of "
                f"the space ({lo_p} params; the space spans {lo_p}..{hi_p}): no legal "
                "architecture"
            )
        if self.space.size <= 1 << 16:
            legal = sum(1 for a in self.space.all_archs() if self.is_legal(a))
            if legal < self.population:
                raise ValueError(
                    f"only {legal} architectures of the space satisfy the limits, fewer than "
                    f"the population of {self.population}: lower population or relax the limits"
                )
            if legal == 0:
                raise ValueError("no architecture satisfies both the FLOPs and params limits")

    # -- proposals --------------------------------------------------------------------------
    def _parent(self) -> Arch:
        return self.top[int(self.rng.integers(len(self.top)))]

    def _fill(self, out: list, seen: set, count: int, make, max_tries: int):
        tries = 0
        while len(out) < count and tries < max_tries:
            tries += 1
            arch = make()
            if arch in seen or not self.is_legal(arch):
                continue
            seen.add(arch)
            out.append(arch)
        return tries

    def propose(self) -> list[Arch]:
        """The candidates of the current generation, in evaluation order."""
        out: list[Arch] = []
        seen: set = set()
        if self.generation > 0:
            if not self.top:
                raise RuntimeError("rank() the previous generation before proposing the next")
            self._fill(out, seen, self.mutations,
                       lambda: self.space.mutate(self._parent(), self.rng, self.mutation_prob),
                       10 * self.mutations)
            n = len(out)
            self._fill(out, seen, n + self.crossovers,
                       lambda: self.space.crossover(self._parent(), self._parent(), self.rng),
                       10 * self.crossovers)
        tries = self._fill(out, seen, self.population, lambda: self.space.sample(self.rng),
                           self.max_random_tries)
        if len(out) < self.population:
            raise RuntimeError(
                f"generation {self.generation}: found only {len(out)} distinct legal "
                f"architectures in {tries} random draws (population {self.population}); the "
                "limits leave too few legal architectures"
            )
        return out

    def record(self, arch: Arch, fitness: dict):
        """Store the latest fitness of ``arch`` (needs ``fitness["top1_err"]``)."""
        self.latest[tuple(arch)] = dict(fitness)

    def rank(self, candidates: list[Arch]):
        """Merge the evaluated candidates into the top-k by latest error and close the
        generation. Ties keep the earlier entry (previous top first, then candidate order)."""
        pool = []
        for arch in self.top + list(candidates):
            if arch not in pool:
                pool.append(arch)
        missing = [a for a in pool if a not in self.latest]
        if missing:
            raise RuntimeError(f"rank(): candidate {missing[0]} was never recorded")
        pool.sort(key=lambda a: self.latest[a]["top1_err"])
        self.top = pool[: self.top_k]
        self.generation += 1

    @property
    def done(self) -> bool:
        """True once generation 0 and ``generations`` evolved generations are ranked."""
        return self.generation > self.generations

    def top_k_list(self) -> list[tuple[Arch, float]]:
        return [(a, float(self.latest[a]["top1_err"])) for a in self.top]

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "generation": self.generation,
            "top": [list(a) for a in self.top],
            "latest": [[list(a), rec] for a, rec in self.latest.items()],
        }

    def load_state_dict(self, state: dict):
        self.rng.bit_generator.state = state["rng"]
        self.generation = int(state["generation"])
        self.top = [self.space.validate(a) for a in state["top"]]
        self.latest = {self.space.validate(a): dict(rec) for a, rec in state["latest"]}

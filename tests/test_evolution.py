"""Evolution operators: seeded, constraint respected, no duplicates, bounded retries, ranking."""

import pytest

from fastshift import EvolutionSearcher, spaces


def _fake_fitness(arch):
    return {"top1_err": sum((g + 1) * (i + 1) for i, g in enumerate(arch)) / 1000.0}


def run_generations(searcher, n):
    gens = []
    for _ in range(n):
        cands = searcher.propose()
        for a in cands:
            searcher.record(a, _fake_fitness(a))
        searcher.rank(cands)
        gens.append(cands)
    return gens


def test_seeded_decisions_repeat():
    space = spaces.spos_shufflenetv2()
    a = run_generations(EvolutionSearcher(space, seed=3, flops_limit=330e6), 3)
    b = run_generations(EvolutionSearcher(space, seed=3, flops_limit=330e6), 3)
    c = run_generations(EvolutionSearcher(space, seed=4, flops_limit=330e6), 3)
    assert a == b and a != c


def test_constraints_and_no_duplicates():
    space = spaces.spos_shufflenetv2()
    lo, hi = space.flops_range()
    limit = (lo + hi) / 2
    plo, phi = space.params_range()
    plimit = (plo + phi) / 2
    s = EvolutionSearcher(space, seed=0, flops_limit=limit, params_limit=plimit)
    for gen in run_generations(s, 4):
        assert len(gen) == 50 and len(set(gen)) == 50
        assert all(space.flops(a) <= limit and space.params(a) <= plimit for a in gen)


def test_generation_layout_and_parents():
    space = spaces.spos_shufflenetv2()
    s = EvolutionSearcher(space, seed=1, mutation_prob=0.1)
    run_generations(s, 1)
    top = list(s.top)
    gen1 = s.propose()
    # first 25 are mutants of top-10 parents: each is close to some parent
    for a in gen1[:25]:
        assert min(sum(x != y for x, y in zip(a, p)) for p in top) <= 8
    # next 25 are crossovers: every gene comes from some parent at that position
    for a in gen1[25:50]:
        assert all(any(p[i] == g for p in top) for i, g in enumerate(a))


def test_rank_uses_latest_error_and_dedupes():
    space = spaces.digits()
    s = EvolutionSearcher(space, population=4, top_k=2, seed=0)
    cands = s.propose()
    errs = [0.4, 0.1, 0.3, 0.2]
    for a, e in zip(cands, errs):
        s.record(a, {"top1_err": e})
    s.rank(cands)
    assert s.top == [cands[1], cands[3]]
    s.record(cands[1], {"top1_err": 0.9})  # re-scored on drifted weights: falls out
    s.rank([cands[1]])
    assert s.top == [cands[3], cands[1]] and len(set(s.top)) == 2


def test_impossible_limit_is_an_error_up_front():
    space = spaces.spos_shufflenetv2()
    lo, _ = space.flops_range()
    with pytest.raises(ValueError, match="below the smallest architecture"):
        EvolutionSearcher(space, flops_limit=lo - 1)
    plo, _ = space.params_range()
    with pytest.raises(ValueError, match="params_limit"):
        EvolutionSearcher(space, params_limit=plo - 1)
    small = spaces.digits()
    flops = sorted(small.flops(a) for a in small.all_archs())
    with pytest.raises(ValueError, match="only 3 architectures"):
        EvolutionSearcher(small, flops_limit=flops[2], population=10, top_k=2)


def test_bounded_retries_instead_of_hanging():
    space = spaces.spos_shufflenetv2()
    lo, _ = space.flops_range()
    s = EvolutionSearcher(space, flops_limit=lo, max_random_tries=500)
    with pytest.raises(RuntimeError, match=r"found only \d distinct legal architectures in 500"):
        s.propose()


def test_state_round_trip_continues_identically():
    space = spaces.spos_shufflenetv2()
    a = EvolutionSearcher(space, seed=9)
    run_generations(a, 2)
    b = EvolutionSearcher(space, seed=123)
    b.load_state_dict(a.state_dict())
    assert run_generations(a, 2) == run_generations(b, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(population=0), "population"), (dict(top_k=60), "cannot exceed"),
    (dict(mutation_prob=1.5), "mutation_prob"), (dict(generations=-1), "generations"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvolutionSearcher(spaces.spos_shufflenetv2(), **kwargs)

"""Cache affinity of the allocation fitness on actors (``evolq.allocation.affinity``): the router
sends an allocation to the actor that already holds its block prefix, within an even share of the
work, and simulated actors (copies of one ``AllocationFitness``, each with its own cache) give the
in-process losses whichever actor computes what."""
import torch

from evolq.allocation.affinity import PrefixRouter


def _keys(nb, genes):
    # an allocation is one gene per block here: the input of block j depends on genes[:j]
    return [[tuple(int(v) for v in g[:j]) for j in range(1, nb)] for g in genes]


def test_children_go_to_the_actor_that_ran_their_parents_within_an_even_share():
    nb = 6
    router = PrefixRouter(nb)
    parents = torch.tensor([[0, 0, 0, 0, 0, i % 2] for i in range(4)] + [[1, 1, 1, 1, 1, i % 2] for i in range(4)])
    first = router.route(_keys(nb, parents), 2)
    assert sorted(first) == [0, 0, 0, 0, 1, 1, 1, 1]  # even: nothing is cached yet
    side = {tuple(p[:5].tolist()): a for p, a in zip(parents, first)}
    # children: only the last gene changes, so each shares its parent's whole prefix (1 block to run)
    kids = torch.cat([parents[:4], parents[4:]]).clone()
    kids[:, 5] += 2
    second = router.route(_keys(nb, kids), 2)
    assert second == [side[tuple(k[:5].tolist())] for k in kids]


def test_a_full_actor_hands_on_work_and_loads_stay_balanced():
    nb = 4
    router = PrefixRouter(nb, slack=0.0)
    router.route(_keys(nb, torch.tensor([[0, 0, 0, 0]])), 2)  # actor 0 holds the prefix of every row below
    rows = torch.tensor([[0, 0, 0, i] for i in range(8)])
    got = router.route(_keys(nb, rows), 2)
    # cheaper on actor 0 (1 block each, 4 on a cold actor 1), but not all of it: actor 1 takes a share,
    # fewer rows than an even split since its first row pays for the whole prefix
    assert 0 < got.count(1) < 4
    cost = {0: [1] * 8, 1: [4] + [1] * 7}
    loads = [sum(cost[a][: got.count(a)]) for a in (0, 1)]
    assert max(loads) < 8 and max(loads) < 4 + 3  # better than all on actor 0 and than halves (4 | 4 + 3)


def test_capacity_bounds_what_the_router_remembers():
    nb = 3
    router = PrefixRouter(nb, capacity=2)
    router.route(_keys(nb, torch.tensor([[i, i, i] for i in range(5)])), 1)
    assert len(router.held[0]) == 2


def test_simulated_actors_give_the_in_process_losses_and_run_fewer_blocks_when_routed():
    from test_allocation import images, tiny_vit  # the tiny ViT of the allocation tests

    from evolq import QuantConfig, prepare_model
    from evolq.allocation.fitness import AllocationFitness
    from evolq.allocation.tables import WeightTables
    from evolq.problems.menu import parse_menu

    x = images(24)
    q = prepare_model(tiny_vit(), x, QuantConfig.preset("outlier-aware", w_bits=3))
    fit = AllocationFitness(WeightTables.build(q, x, parse_menu("2,3,4,8"), "rtn"), x[:16], chunk=8)
    nl = len(fit.tables.layers)
    g = torch.Generator().manual_seed(0)
    parents = torch.randint(0, len(fit.tables.menu), (6, nl), generator=g)
    gens = [parents]
    for _ in range(3):  # each generation: children of the last one, a few late genes changed
        kids = gens[-1].clone()
        cols = torch.randint(nl // 2, nl, (kids.shape[0],), generator=g)
        kids[torch.arange(kids.shape[0]), cols] = torch.randint(0, len(fit.tables.menu), (kids.shape[0],),
                                                                generator=g)
        gens.append(kids[torch.randperm(kids.shape[0], generator=g)])
    from ray import cloudpickle  # what ships the fitness to actors (blocks' closures by value)

    fresh = [cloudpickle.loads(cloudpickle.dumps(fit)) for _ in range(6)]  # empty caches and memos
    ref = [fit(x) for x in gens]

    def run(routed: bool):
        driver, actors = fresh.pop(), [fresh.pop(), fresh.pop()]
        out = []
        for x in gens:
            order = sorted(range(x.shape[0]), key=lambda i: tuple(x[i][fit.order].tolist()))
            x = x[order]
            if routed:
                who = driver.route(x, 2)
            else:
                who = [0 if i < x.shape[0] // 2 else 1 for i in range(x.shape[0])]
            loss = torch.empty(x.shape[0], dtype=torch.float64)
            for a in range(2):
                idx = [i for i in range(x.shape[0]) if who[i] == a]
                if idx:
                    loss[idx] = actors[a](x[idx])
            back = torch.empty_like(loss)
            back[torch.tensor(order)] = loss
            out.append(back)
        return out, sum(a.blocks_run for a in actors)

    routed, blocks_routed = run(True)
    plain, blocks_plain = run(False)
    for r, a, b in zip(ref, routed, plain):
        assert torch.equal(r, a) and torch.equal(r, b)  # bit-identical wherever they ran
    assert blocks_routed <= blocks_plain

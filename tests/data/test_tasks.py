import numpy as np
import pytest

from loopformer.data.tasks import PAD, TASKS, Task, make_task
from loopformer.errors import DataError

# (task, task_args, difficulties, answer length for difficulty d)
CASES = [
    ("pointer_chase", {}, [1, 2, 5, 10, 19], lambda d: 1),
    ("pointer_chase", {"num_nodes": 8, "num_symbols": 8}, [1, 3, 7], lambda d: 1),
    ("prefix_parity", {}, [1, 3, 8, 20], lambda d: d),
    ("prefix_parity", {"aligned": False}, [1, 3, 8, 20], lambda d: d),
    ("p_hop", {}, [1, 4, 16, 62], lambda d: 1),
    ("p_hop", {"length": 12, "alphabet": 2}, [1, 5, 10], lambda d: 1),
    ("addition", {}, [1, 2, 5, 12], lambda d: d + 1),
    ("addition", {"paired": True}, [1, 2, 5, 12], lambda d: d + 1),
    ("addition", {"paired": True, "runs": True}, [1, 2, 5, 12], lambda d: 2 * d + 7),
    ("addition", {"aligned": True, "runs": True}, [1, 2, 5, 12], lambda d: 2 * d + 7),
    ("addition", {"aligned": True, "runs": True, "pad": True}, [1, 2, 5, 12], lambda d: 2 * d + 7),
    ("maze", {}, [1, 2, 5, 8, 16], lambda d: 2 * d),
    ("maze", {"rows": 3}, [1, 4, 9], lambda d: 3 * d),
    ("maze", {"rows": 1}, [1, 3, 10], lambda d: d),
    ("maze", {"entrance": True}, [1, 2, 5, 8, 16], lambda d: 2 * d),
    ("maze", {"entrance": True, "exit": True}, [1, 2, 5, 8, 16], lambda d: 2 * d),
    ("maze", {"exit": True, "rows": 3}, [1, 4, 9], lambda d: 3 * d),
]


def test_registry():
    assert set(TASKS) == {"pointer_chase", "prefix_parity", "p_hop", "addition", "maze"}
    for name, cls in TASKS.items():
        assert cls.name == name and issubclass(cls, Task) and cls.__doc__


@pytest.mark.parametrize("name,kwargs,diffs,answer_len", CASES)
def test_generator_matches_solver(name, kwargs, diffs, answer_len):
    task = make_task(name, **kwargs)
    task.validate_difficulty(min(diffs), max(diffs))
    seq_len = task.seq_len(max(diffs))
    rng = np.random.default_rng(0)
    for i in range(200):
        d = diffs[i % len(diffs)]
        ex = task.example(rng, d, seq_len)
        assert {k: (v.shape, v.dtype) for k, v in ex.items()} == {
            "inputs": ((seq_len,), np.int32),
            "targets": ((seq_len,), np.int32),
            "mask": ((seq_len,), np.float32),
            "segment_ids": ((seq_len,), np.int32),
        }
        inputs, targets, mask = ex["inputs"], ex["targets"], ex["mask"]
        assert task.solve(inputs) == task.answer(ex)
        assert mask.sum() == answer_len(d) and set(np.unique(mask)) <= {0.0, 1.0}
        n = int((inputs != PAD).sum())  # real tokens, then padding only
        assert (inputs[:n] != PAD).all() and (inputs[n:] == PAD).all() and (targets[n:] == PAD).all()
        np.testing.assert_array_equal(ex["segment_ids"], (np.arange(seq_len) < n).astype(np.int32))  # 0 = padding
        if task.labels_aligned and name == "maze":  # a label at every room, none at the column separators
            np.testing.assert_array_equal(mask[:n], (inputs[:n] != task.SEP).astype(np.float32))
            assert (mask[n:] == 0).all() and set(targets[mask > 0]) <= {task.YES, task.NO}
        elif name == "addition" and task.aligned:  # a label at every answer slot, the last tokens
            np.testing.assert_array_equal(mask[:n], [0.0] * (n - answer_len(d)) + [1.0] * answer_len(d))
            assert (inputs[n - answer_len(d):n] == task.SLOT).all() and (mask[n:] == 0).all()
        elif task.labels_aligned:  # a label at every input position after BOS, none in the inputs
            np.testing.assert_array_equal(mask[:n], [0.0] + [1.0] * (n - 1))
            assert (mask[n:] == 0).all() and (targets[1:n] != PAD).all()
        else:
            np.testing.assert_array_equal(inputs[1:n], targets[: n - 1])  # next-token targets
            assert mask[n - 1] == 1.0 and (mask[n:] == 0).all()  # the answer ends the sequence
        assert inputs.min() >= 0 and max(inputs.max(), targets.max()) < task.vocab_size
        assert isinstance(task.render(inputs), str) and isinstance(task.render(inputs, task.answer(ex)), str)
        if name in ("prefix_parity", "pointer_chase", "p_hop"):  # the difficulty is the chain length
            assert task.depth(inputs) == d
        elif name == "maze":  # the farthest reachable room: within the rooms, and YES-labelled rooms only
            assert 0 <= task.depth(inputs) < mask.sum() and task.depth(inputs) < (targets == task.YES).sum()
        elif task.labels_aligned:  # one-pass addition: 1 + the longest carry chain, within the places
            assert 1 <= task.depth(inputs) <= mask.sum()
        else:
            assert task.depth(inputs) is None


@pytest.mark.parametrize("name,kwargs,diffs,answer_len", CASES)
def test_deterministic_per_rng(name, kwargs, diffs, answer_len):
    task = make_task(name, **kwargs)
    seq_len = task.seq_len(max(diffs))
    a = task.example(np.random.default_rng([3, 1]), diffs[-1], seq_len)
    b = task.example(np.random.default_rng([3, 1]), diffs[-1], seq_len)
    c = task.example(np.random.default_rng([3, 2]), diffs[-1], seq_len)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["inputs"], c["inputs"])


def _depths(parent: dict[int, int]) -> dict[int, int]:
    out = {}
    for v in parent:
        node, hops = v, 0
        while parent[node] != node:
            node, hops = parent[node], hops + 1
            assert hops <= len(parent), "cycle that is not a root self-loop"
        out[v] = hops
    return out


@pytest.mark.parametrize("d", [1, 3, 6, 12, 19])
def test_pointer_chase_structure(d):
    task = make_task("pointer_chase")
    rng = np.random.default_rng(d)
    ties = 0
    for _ in range(100):
        ex = task.example(rng, d, task.seq_len(d))
        toks = ex["inputs"][: 3 * task.num_nodes].reshape(-1, 3)
        assert (toks[:, 2] == task.SEP).all()
        parent = dict(zip(toks[:, 0].tolist(), toks[:, 1].tolist(), strict=True))
        assert len(parent) == task.num_nodes  # one outgoing edge per node, distinct names
        assert set(parent.values()) <= set(parent)  # every parent is a node
        depth = _depths(parent)  # every chain ends in a root that points to itself
        q = int(ex["inputs"][3 * task.num_nodes + 1])
        assert ex["inputs"][3 * task.num_nodes] == task.QUERY
        assert depth[q] == d and max(depth.values()) == d
        root = task.answer(ex)[0]
        assert parent[root] == root and depth[root] == 0
        roots_at_d = {_root(parent, v) for v, h in depth.items() if h == d}
        ties += len(roots_at_d) > 1
    if 2 * (d + 1) <= task.num_nodes:  # another chain of exactly d hops shows up regularly
        assert ties >= 20


def _root(parent: dict[int, int], v: int) -> int:
    while parent[v] != v:
        v = parent[v]
    return v


def test_p_hop_solver_checks_hops():
    task = make_task("p_hop", length=6, alphabet=4)
    a, b, c, d = (task.FIRST + i for i in range(4))
    prompt = lambda p, x: np.array([task.BOS, task._hop_token(p), *x, task.EQ], np.int32)
    x = [b, a, c, d, a, d]  # d (index 5) -> d at 3, then a (4) -> a at 1, then c (2) -> no earlier c
    assert task.solve(prompt(1, x)) == [a]
    assert task.solve(prompt(2, x)) == [c]
    with pytest.raises(ValueError, match="hop 3"):
        task.solve(prompt(3, x))
    with pytest.raises(ValueError, match="hop 1"):
        task.solve(prompt(1, [a, b, c, a, d, d]))  # the only earlier d is adjacent: no move


def test_p_hop_answers_vary():
    task = make_task("p_hop")
    rng = np.random.default_rng(0)
    answers = {task.answer(task.example(rng, 16, task.seq_len(16)))[0] for _ in range(50)}
    assert len(answers) == task.alphabet


@pytest.mark.parametrize("entrance", [False, True])
@pytest.mark.parametrize("rows,d", [(2, 1), (2, 8), (2, 16), (3, 6), (1, 9)])
def test_maze_is_a_tree_with_one_cut(rows, d, entrance):
    """rows*d rooms, rows*d - 2 open passages, no cycle (a spanning tree minus one edge: exactly two
    regions), the start's region and the other both >= a quarter of the rooms; labels = the start's
    region. Entered from the left wall: the start is in column 0 and its region holds >= half the rooms."""
    task = make_task("maze", rows=rows, entrance=entrance)
    rng = np.random.default_rng(rows * 100 + d)
    n = rows * d
    for _ in range(50):
        ex = task.example(rng, d, task.seq_len(d))
        right, down, (_, start_col) = task.parse(ex["inputs"])
        dist = task.distances(ex["inputs"])
        assert right.sum() + down.sum() == n - 2 if n > 1 else right.sum() + down.sum() == 0
        assert not right[:, -1].any() and not down[-1].any()  # no passage leaves the grid
        reach = len(dist)
        if n > 1:
            assert min(reach, n - reach) >= max(1, n // 4)
        if entrance:
            assert start_col == 0 and (n == 1 or reach >= n // 2)
        labels = np.asarray(task.answer(ex)).reshape(d, rows).T
        assert {rc for rc in zip(*np.nonzero(labels == task.YES), strict=True)} == set(dist)


def test_maze_harder_mazes_need_more_steps():
    """The difficulty knob: the farthest reachable room is farther (in passages) in longer mazes, and
    a maze of d columns needs more than d steps in some cases (paths wind)."""
    task = make_task("maze")
    rng = np.random.default_rng(0)
    far = {d: [task.depth(task.example(rng, d, task.seq_len(d))["inputs"]) for _ in range(200)] for d in (4, 8, 16, 32)}
    means = [np.mean(far[d]) for d in (4, 8, 16, 32)]
    assert means == sorted(means) and means[-1] > 3 * means[1]
    assert max(far[16]) > 16


def test_maze_entered_from_the_left_needs_steps_that_grow_with_its_length():
    """Entered from the left wall, a d-column maze's start region reaches column >= d/2 - 1 (it holds
    >= d of its 2d rooms), so every maze needs >= ceil(d/2) - 1 steps; with a start anywhere some 32-column
    mazes need only a few. Doubling d about doubles the mean (the benchmark's 2x split is twice as deep)."""
    far = {}
    for entrance in (False, True):
        task, rng = make_task("maze", entrance=entrance), np.random.default_rng(1)
        far[entrance] = {d: np.array([task.depth(task.example(rng, d, task.seq_len(d))["inputs"]) for _ in range(200)])
                         for d in (8, 16, 32)}
    for d, depths in far[True].items():
        assert depths.min() >= (d + 1) // 2 - 1
    assert far[False][32].min() < 15 <= far[True][32].min()
    assert 1.8 < far[True][32].mean() / far[True][16].mean() < 2.2
    assert 1.8 < far[True][16].mean() / far[True][8].mean() < 2.2


@pytest.mark.parametrize("rows,d", [(2, 1), (2, 2), (2, 8), (2, 16), (3, 6)])
def test_maze_with_an_exit_spans_every_column(rows, d):
    """entrance + exit: the start in column 0 and a room of the last column in its region, so the maze
    needs >= d - 1 steps; one passage is still closed (n - 2 open, some rooms cut off)."""
    task = make_task("maze", rows=rows, entrance=True, exit=True)
    rng = np.random.default_rng(7 * d + rows)
    n = rows * d
    for _ in range(30):
        inputs = task.example(rng, d, task.seq_len(d))["inputs"]
        right, down, start = task.parse(inputs)
        dist = task.distances(inputs)
        assert start[1] == 0 and any(c == d - 1 for _, c in dist) and task.depth(inputs) >= d - 1
        assert n == 1 or (right.sum() + down.sum() == n - 2 and len(dist) < n)


def test_maze_render():
    task = make_task("maze")
    ex = task.example(np.random.default_rng(5), 4, task.seq_len(4))
    text = task.render(ex["inputs"], task.answer(ex))
    assert text.count("S") == 1 and text.count("#") + text.count(".") == 7  # 8 rooms, the start among them
    right, down, _ = task.parse(ex["inputs"])
    assert text.count("-") == right.sum() and text.count("|") == down.sum()
    with pytest.raises(ValueError, match="SEP"):
        task.parse(ex["inputs"][:-1])


def test_addition_and_parity_values():
    add = make_task("addition")
    rng = np.random.default_rng(0)
    for d in (1, 3, 9):
        ex = add.example(rng, d, add.seq_len(9))
        lhs, c = add.render(ex["inputs"], add.answer(ex)).split("=")
        a, b = lhs.split("+")
        assert len(a) == len(b) == d and len(c) == d + 1 and int(a) + int(b) == int(c)
    for aligned in (True, False):
        par = make_task("prefix_parity", aligned=aligned)
        assert par.seq_len(12) == (13 if aligned else 25)
        ex = par.example(rng, 12, par.seq_len(12))
        bits, parity = par.render(ex["inputs"], par.answer(ex)).split(" | ")
        assert len(bits) == 12 and parity == "".join(str(int(s) % 2) for s in np.cumsum([int(b) for b in bits]))
    ex = make_task("prefix_parity").example(np.random.default_rng(1), 4, 6)  # DeepThinking's aligned form
    bits = ex["inputs"][1:5] - 3
    np.testing.assert_array_equal(ex["targets"][1:5] - 3, np.cumsum(bits) % 2)
    assert ex["inputs"][0] == 1 and ex["inputs"][5] == 0 and ex["mask"].tolist() == [0, 1, 1, 1, 1, 0]


def test_a_wrong_token_renders_as_its_id_not_as_a_digit():
    """#27 pass 12: `generate` showed an untrained paired-addition model's pair token 42 as the digits "38" (and
    parity's BOS as "-2"): the answer column read as a number the model never wrote."""
    add = make_task("addition", paired=True)
    ex = add.example(np.random.default_rng(0), 3, add.seq_len(3))
    assert add.render(ex["inputs"], [4, 42, 13, 4]).endswith("=09<42>0")  # reversed: the last place first
    par = make_task("prefix_parity")
    ex = par.example(np.random.default_rng(0), 3, par.seq_len(3))
    assert par.render(ex["inputs"], [3, 1, 5]).endswith(" | 0<1><5>")


def test_a_wrong_token_renders_as_no_symbol_or_room_mark_it_is_not():
    """#27 pass 38: `generate` showed pointer_chase's EQ token as the node '9' (``_NAMES[-1]``), p_hop's PAD as the
    symbol 'X', and a maze room whose predicted token is a room token as '.' (an unreachable room, an answer the
    model never gave)."""
    chase = make_task("pointer_chase")
    ex = chase.example(np.random.default_rng(0), 2, chase.seq_len(2))
    assert chase.render(ex["inputs"], [chase.EQ]).endswith(f" = <{chase.EQ}>")
    hop = make_task("p_hop")
    ex = hop.example(np.random.default_rng(0), 2, hop.seq_len(2))
    assert hop.render(ex["inputs"], [0]).endswith(" = <0>")
    assert hop.render(ex["inputs"], [hop.FIRST]).endswith(" = a")  # the first symbol, as before
    # #27 pass 40: a hop token (above the symbols) showed as the symbol 'e', past the alphabet a-d
    assert hop.render(ex["inputs"], [hop._hop_token(1)]).endswith(f" = <{hop._hop_token(1)}>")
    assert hop.render(ex["inputs"], [hop.FIRST + hop.alphabet - 1]).endswith(" = d")
    # #27 pass 40's leftover: `<i>` was both a token id and (past the names) a symbol's index; an edge token above
    # pointer_chase's symbols showed as a symbol the task does not hold ('g' of A-f)
    edges = make_task("pointer_chase", edge_tokens=True, num_nodes=4, num_symbols=4)
    ex = edges.example(np.random.default_rng(0), 2, edges.seq_len(2))
    assert edges.render(ex["inputs"], [edges.FIRST + 4]).endswith(f" = <{edges.FIRST + 4}>")
    assert edges.render(ex["inputs"], [edges.FIRST + 3]).endswith(" = D")
    many = make_task("p_hop", alphabet=40)
    ex = many.example(np.random.default_rng(0), 2, many.seq_len(2))
    assert many.render(ex["inputs"], [many.FIRST + 38]).endswith(" = #38")
    wide = make_task("pointer_chase", num_nodes=4, num_symbols=70)
    ex = wide.example(np.random.default_rng(0), 2, wide.seq_len(2))
    assert wide.render(ex["inputs"], [wide.FIRST + 65]).endswith(" = #65")
    maze = make_task("maze", rows=2)
    ex = maze.example(np.random.default_rng(0), 3, maze.seq_len(3))
    text = maze.render(ex["inputs"], [5] * 6)
    assert text.count("?") == 5 and "." not in text and "#" not in text  # the start stays S
    assert maze.render(ex["inputs"], [maze.NO] * 6).count(".") == 5


def test_aligned_addition_asks_for_every_digit_in_one_pass():
    """``aligned: true``: the answer's d + 1 places are SLOT tokens in the input, labelled with c's digits;
    the next-token form's examples are unchanged, and depth is the longest carry chain + 1."""
    add, plain = make_task("addition", aligned=True), make_task("addition")
    assert (add.vocab_size, plain.vocab_size) == (15, 14) and add.seq_len(8) == 28 and plain.seq_len(8) == 27
    assert add.digits == (4, 14) and plain.digits == (4, 13) and add.labels_aligned and not plain.labels_aligned
    ex = add.example(np.random.default_rng(0), 3, add.seq_len(4))
    inputs, targets, mask = ex["inputs"], ex["targets"], ex["mask"]
    assert inputs[:13].tolist()[-4:] == [add.SLOT] * 4 and inputs[8] == add.EQ and inputs[13:].tolist() == [0, 0, 0]
    a, b = add.parse(inputs)
    total = int("".join(map(str, a[::-1]))) + int("".join(map(str, b[::-1])))
    assert [t - add.ZERO for t in add.answer(ex)] == [int(ch) for ch in str(total).zfill(4)[::-1]]
    assert add.answer(ex) == add.solve(inputs) and mask.tolist() == [0] * 9 + [1] * 4 + [0] * 3
    assert (targets[:9] == 0).all()
    # depth: 1 + the longest carry chain (generate at a place, then propagate through places summing to 9)
    def depth(a_rev, b_rev):
        z = add.ZERO
        toks = [add.BOS, *(x + z for x in a_rev), add.PLUS, *(x + z for x in b_rev), add.EQ]
        return add.depth(np.asarray(toks + [add.SLOT] * (len(a_rev) + 1)))
    assert depth([1, 2, 3], [1, 2, 3]) == 1  # no carry
    assert depth([5, 4, 4, 1], [5, 5, 5, 1]) == 4  # generate at place 0, propagate through places 1 and 2
    assert depth([9, 5, 0], [0, 5, 9]) == 3  # place 0 sums to 9 with no carry in; the chain starts at place 1
    assert plain.depth(inputs[:9]) is None


@pytest.mark.parametrize("aligned", [False, True])
def test_padded_addition_writes_each_operand_as_long_as_the_sum(aligned):
    """``pad: true``: a and b get a leading zero (last, reversed), so the sum's final carry sits at a place both
    operands have; the answer is the unpadded sum's, and the sequence grows by exactly those two zeros."""
    pad, plain = make_task("addition", pad=True, aligned=aligned), make_task("addition", aligned=aligned)
    assert pad.seq_len(8) == plain.seq_len(8) + 2 and pad.max_place(8) == plain.max_place(8) == 9
    for d in (1, 4, 8):
        got, want = pad.example(np.random.default_rng(d), d, pad.seq_len(8)), plain.example(
            np.random.default_rng(d), d, plain.seq_len(8))
        a, b = pad.parse(got["inputs"])
        assert len(a) == len(b) == d + 1 and a[-1] == b[-1] == 0 and (a[:-1], b[:-1]) == plain.parse(want["inputs"])
        assert pad.answer(got) == plain.answer(want) == pad.solve(got["inputs"])  # d + 1 digits either way
        assert got["mask"].sum() == want["mask"].sum() == d + 1
        if aligned:
            assert pad.depth(got["inputs"]) == plain.depth(want["inputs"])
    with pytest.raises(DataError, match="data.task_args.pad writes separate operands"):
        make_task("addition", pad=True, paired=True)


def test_addition_with_carry_chains_as_the_difficulty():
    """``width: W``: every example has W-digit operands and its longest carry chain is exactly its
    difficulty (depth d + 1), at every place of the chain's start; labels are the sum's digits."""
    add = make_task("addition", aligned=True, width=12)
    assert add.seq_len(1) == add.seq_len(12) == 40 and add.max_place(3) == 13
    rng = np.random.default_rng(0)
    starts = set()
    for i in range(300):
        d = 1 + i % 12
        ex = add.example(rng, d, add.seq_len(12))
        a, b = add.parse(ex["inputs"])
        assert len(a) == len(b) == 12 and add.depth(ex["inputs"]) == d + 1
        assert add.answer(ex) == add.solve(ex["inputs"]) and ex["mask"].sum() == 13
        run, end = 0, None  # where the longest chain ends
        for j, x in enumerate(np.asarray(a) + np.asarray(b)):
            run = 1 if x >= 10 else run + 1 if (x == 9 and run) else 0
            end = j if run == d and end is None else end
        starts.add(end - d + 1)
    assert len(starts) >= 10  # the planted chain starts anywhere (0..12 - d)
    with pytest.raises(DataError, match=r"the longest carry chain must be in \[1, 12\]; lower the difficulty or "
                                        r"raise data.task_args.width"):
        add.validate_difficulty(1, 13)
    with pytest.raises(DataError, match="data.task_args.width .* add aligned: true"):
        make_task("addition", width=12)


def test_paired_addition_holds_both_digits_of_a_place_in_one_token():
    """``paired: true``: input ``BOS p_0 .. p_{d-1} SLOT``, p_i = PAIR + 10 a_i + b_i, labels c_i at p_i and the
    carry digit at SLOT; everything else (answers, depth, rendering) as the other forms."""
    add = make_task("addition", paired=True)
    assert (add.vocab_size, add.seq_len(8), add.max_place(8), add.digits) == (115, 10, 9, (14, 114))
    assert add.labels_aligned and add.difficulty_meaning == "digits per operand"
    ex = add.example(np.random.default_rng(0), 3, add.seq_len(4))
    inputs = ex["inputs"].tolist()
    a, b = add.parse(ex["inputs"])
    assert inputs == [1, *(15 + 10 * x + y for x, y in zip(a, b, strict=True)), 14, 0]
    total = int("".join(map(str, a[::-1]))) + int("".join(map(str, b[::-1])))
    assert [t - add.ZERO for t in add.answer(ex)] == [int(ch) for ch in str(total).zfill(4)[::-1]]
    assert ex["mask"].tolist() == [0, 1, 1, 1, 1, 0] and add.render(ex["inputs"], add.answer(ex)) == (
        f"{''.join(map(str, a[::-1]))}+{''.join(map(str, b[::-1]))}={str(total).zfill(4)}")
    # 5 + 5 generates, 4 + 5 and 4 + 5 propagate (the carry reaches place 3), 1 + 1 stops it
    toks = np.asarray([1, 15 + 55, 15 + 45, 15 + 45, 15 + 11, 14])
    assert add.depth(toks) == 4 and add.solve(toks) == [4 + c for c in (0, 0, 0, 3, 0)]
    with pytest.raises(ValueError, match="BOS pairs SLOT"):
        add.parse(toks[:-1])


def test_paired_addition_with_runs_as_the_difficulty():
    """``runs: true``: 2d + 6 places holding one run of d places summing to 9 after a place that generates a
    carry (answer digits 0) and one after a place that does not (9s), in either order, anywhere."""
    add = make_task("addition", paired=True, runs=True)
    assert add.seq_len(8) == 24 and add.seq_len(32) == 72 and add.max_place(16) == 39
    assert add.difficulty_meaning == "the length of the runs of places summing to 9"
    rng = np.random.default_rng(0)
    orders, starts = set(), set()
    for i in range(300):
        d = 1 + i % 12
        ex = add.example(rng, d, add.seq_len(12))
        a, b = add.parse(ex["inputs"])
        sums, digits = np.add(a, b), [t - add.ZERO for t in add.answer(ex)]
        assert len(a) == 2 * d + 6 and add.answer(ex) == add.solve(ex["inputs"])
        if d >= 2:  # (two random places can make a chain of 3)
            assert add.depth(ex["inputs"]) == d + 2
        found = []  # (head's sum >= 10, start) of every run of exactly d nines with a head before it
        j = 0
        while j < len(sums):
            k = j
            while k < len(sums) and sums[k] == 9:
                k += 1
            if k - j == d and j > 0 and sums[j - 1] != 9:
                found.append((bool(sums[j - 1] >= 10), j))
                assert digits[j:k] == ([0] * d if sums[j - 1] >= 10 else [9] * d)
            j = max(k, j + 1)
        heads = [g for g, _ in found]
        assert True in heads and False in heads  # a run with the carry and one without
        orders.add(heads.index(True) < heads.index(False))
        starts.add(found[0][1])
    assert orders == {True, False} and starts >= {1, 2, 3}  # either run first, after 0, 1 or 2 random places
    with pytest.raises(DataError, match="runs .* add paired: true"):
        make_task("addition", runs=True)
    with pytest.raises(DataError, match="runs .* drop width"):
        make_task("addition", aligned=True, width=32, runs=True)


def test_aligned_addition_with_runs_writes_the_paired_examples_operands_apart():
    """``runs`` with ``aligned``: the same a and b as the paired form draws from one seed, written as separate
    operands of 2d + 6 digits (and a leading zero with ``pad``), every answer digit labelled at its slot."""
    paired, apart = make_task("addition", paired=True, runs=True), make_task("addition", aligned=True, runs=True,
                                                                             pad=True)
    assert apart.seq_len(8) == 3 * 22 + 6 and apart.max_place(16) == 39
    for d in (1, 4, 16):
        ex_p = paired.example(np.random.default_rng(d), d, paired.seq_len(16))
        ex_a = apart.example(np.random.default_rng(d), d, apart.seq_len(16))
        a, b = apart.parse(ex_a["inputs"])
        assert (a[:-1], b[:-1]) == paired.parse(ex_p["inputs"]) and a[-1] == b[-1] == 0
        assert apart.answer(ex_a) == paired.answer(ex_p) == apart.solve(ex_a["inputs"])
        assert apart.depth(ex_a["inputs"]) == paired.depth(ex_p["inputs"])
    with pytest.raises(DataError, match="paired is a one-pass form .* drop aligned and width"):
        make_task("addition", paired=True, aligned=True)


@pytest.mark.parametrize(
    "name,kwargs,needle",
    [
        ("nope", {}, "pointer_chase"),
        ("pointer_chase", {"num_nodez": 3}, "num_nodez"),
        ("pointer_chase", {"num_nodez": 3}, "num_symbols"),
        ("pointer_chase", {"num_nodes": 40}, "num_symbols"),
        ("pointer_chase", {"num_nodes": "20"}, "num_nodes"),
        ("pointer_chase", {"num_nodes": 1}, "num_nodes"),
        ("p_hop", {"alphabet": 1}, "alphabet"),
        ("p_hop", {"length": 2.5}, "length"),
        ("addition", {"digits": 3}, "digits"),
        ("prefix_parity", {"aligned": "yes"}, "aligned"),
        ("maze", {"rows": 0}, "rows"),
        ("maze", {"cols": 4}, "cols"),
        ("maze", {"entrance": 1}, "entrance"),
        ("maze", {"exit": "yes"}, "exit"),
        ("maze", {"exit": True, "rows": 1}, "rows >= 2"),
        # #27 pass 19: a permutation of 1e8 symbols per example, until the machine ran out of memory
        ("pointer_chase", {"num_nodes": 5, "num_symbols": 99999999}, "a vocabulary of 100,000,003 tokens, more than "
         "the 1,048,576 a model may have"),
        ("pointer_chase", {"num_symbols": 1025, "edge_tokens": True}, "vocabulary of 1,051,654 tokens"),
        ("p_hop", {"alphabet": 99999999999}, "vocabulary of 100,000,000,064 tokens"),
    ],
)
def test_bad_task_args(name, kwargs, needle):
    with pytest.raises(DataError, match=needle):
        make_task(name, **kwargs)


@pytest.mark.parametrize(
    "name,lo,hi,needle",
    [
        ("pointer_chase", 1, 20, "num_nodes"),
        ("p_hop", 2, 63, "length"),
        ("addition", 0, 3, "difficulty"),
        ("prefix_parity", 4, 2, "difficulty"),
        ("prefix_parity", 1, 2.0, "difficulty"),
    ],
)
def test_impossible_difficulty(name, lo, hi, needle):
    with pytest.raises(DataError, match=needle):
        make_task(name).validate_difficulty(lo, hi)


@pytest.mark.parametrize("args", [{"rows": 1, "entrance": True}, {"rows": 1}, {"rows": 2, "entrance": True},
                                  {"rows": 2, "exit": True}])
def test_a_maze_of_one_column_is_made_at_every_row_count(args):
    """#27 pass 38: a one-row maze with an entrance (configs/maze3.yaml with data.task_args.rows=1) at difficulty 1 is one
    room, with no passage to close: a ValueError traceback ("argmax of an empty sequence") building the eval split."""
    task = make_task("maze", **args)
    for d in (1, 2, 3):
        ex = task.example(np.random.default_rng(d), d, task.seq_len(3))
        assert len(task.answer(ex)) == task.rows * d and task.answer(ex)  # every room labelled, the start reachable
        assert task.render(ex["inputs"], task.answer(ex)).count("S") == 1

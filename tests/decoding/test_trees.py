"""DraftTree: static trees from paths of child ranks, in the order and encodings the tree ops take."""
from __future__ import annotations

import random

import pytest
import torch

from fastvlm_kernels.decoding.trees import DraftTree
from fastvlm_kernels.ops import accept_greedy, accept_greedy_tree, verify_attention

from ..helpers import make_inputs, seed_from

# The 7-path tree of the module docstring's example, with the nodes as they must come out.
PATHS = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (2,)]


def test_paths_become_nodes_in_depth_order_with_parents_masks_and_levels():
    tree = DraftTree.from_paths(PATHS)
    assert tree.paths == ((), (0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert tree.parents == (-1, 0, 0, 0, 1, 1, 2, 4)
    assert tree.depths == (0, 1, 1, 1, 2, 2, 2, 3) and tree.depth == 3
    assert tree.ranks == (0, 0, 1, 2, 0, 1, 0, 0)
    assert tree.levels == ((0,), (1, 2, 3), (4, 5, 6), (7,))
    assert tree.ancestor_masks == (0b1, 0b11, 0b101, 0b1001, 0b10011, 0b100011, 0b1000101, 0b10010011)
    assert [tree.children_needed(j) for j in range(tree.num_nodes)] == [3, 2, 1, 0, 1, 0, 0, 0]


@pytest.mark.parametrize("seed", range(5))
def test_any_order_of_the_paths_gives_the_same_tree(seed):
    shuffled = list(PATHS)
    random.Random(seed).shuffle(shuffled)
    assert DraftTree.from_paths(shuffled) == DraftTree.from_paths(PATHS)


def _random_paths(seed: int, num_paths: int):
    rng = random.Random(seed)
    paths = {(0,)}
    while len(paths) < num_paths:
        parent = rng.choice(sorted(paths | {()}))
        paths.add(parent + (rng.randrange(4),))
    return sorted(paths)


@pytest.mark.parametrize("num_paths", [1, 5, 20, 63])
def test_masks_hold_exactly_each_nodes_ancestors(num_paths):
    tree = DraftTree.from_paths(_random_paths(seed_from("masks", num_paths), num_paths))
    assert tree.num_nodes == num_paths + 1
    parents, masks = tree.tensors()
    for j in range(tree.num_nodes):
        assert 0 <= tree.parents[j] < j or (j == 0 and tree.parents[j] == -1)
        assert tree.paths[j][:-1] == tree.paths[max(tree.parents[j], 0)] or j == 0
        ancestry, node = set(), j
        while node >= 0:
            ancestry.add(node)
            node = tree.parents[node]
        stored = int(masks[j]) & (2 ** 64 - 1)        # the int64 two's complement back to the bits
        assert {i for i in range(tree.num_nodes) if stored >> i & 1} == ancestry
    assert parents.tolist() == list(tree.parents)


def test_a_chain_is_a_tree_the_ops_treat_as_a_chain():
    """The chain tree's masks are causal and its parents a chain: tree attention equals chain attention and
    tree acceptance equals chain acceptance on random inputs."""
    draft_len = 6
    tree = DraftTree.chain(draft_len)
    parents, masks = tree.tensors()
    batch = 3
    q, k_cache, v_cache, prefix_lens, _ = make_inputs(batch, 4, 2, draft_len + 1, 64, (5, 0, 9), "chain",
                                                      torch.float32, seed=seed_from("chain-attention"))
    torch.testing.assert_close(verify_attention(q, k_cache, v_cache, prefix_lens, masks.expand(batch, -1)),
                               verify_attention(q, k_cache, v_cache, prefix_lens), rtol=0, atol=0)
    generator = torch.Generator().manual_seed(seed_from("chain-acceptance"))
    drafts = torch.randint(0, 3, (batch, draft_len), generator=generator)
    targets = torch.randint(0, 3, (batch, draft_len + 1), generator=generator)
    chain = accept_greedy(drafts, targets)
    nodes = torch.cat([torch.full((batch, 1), -1), drafts], dim=1)
    as_tree = accept_greedy_tree(nodes, parents.expand(batch, -1), targets)
    assert torch.equal(as_tree.accept_len, chain.accept_len) and torch.equal(as_tree.emitted, chain.emitted)


@pytest.mark.parametrize("paths, error, words", [
    ([(0,), (1, 0)], ValueError, r"\(1,\) is missing"),
    ([(0,), (0, -1)], ValueError, "must be >= 0"),
    ([(0,), (0,)], ValueError, "twice"),
    ([(0,), ()], ValueError, "empty"),
    ([], ValueError, "paths is empty"),
    ([(0,), (0, 1.0)], TypeError, "ints"),
    ([(0,), (True,)], TypeError, "ints"),
    ([(0,), 1], TypeError, r"paths\[1\]"),
    ("0", TypeError, "list of paths"),
    ([(0,) * depth for depth in range(1, 65)], ValueError, "exceed the 64 tokens"),
], ids=["missing-parent", "negative-rank", "repeated", "empty-path", "no-paths", "float-rank", "bool-rank",
        "not-a-path", "a-string", "too-many-nodes"])
def test_bad_paths_are_refused_naming_the_argument(paths, error, words):
    with pytest.raises(error, match=words):
        DraftTree.from_paths(paths)


def test_bad_chain_length():
    for draft_len in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="draft_len"):
            DraftTree.chain(draft_len)
    assert DraftTree.chain(63).num_nodes == 64          # the most a tree mask holds: bit 63 set
    assert int(DraftTree.chain(63).tensors()[1][-1]) == -1

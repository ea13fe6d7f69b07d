"""Why one tree pass can verify many draft branches: each node of a draft tree, attended with its ancestor
bitmask, gets exactly the output it would get as the last token of a plain chain (its root-to-node path).

    python python/tree_attention_check.py [--nodes 24] [--prefix 600] [--backend auto]

Builds a random draft tree over a cached prefix, runs verify_attention once with the tree mask, then, for
every node, lays its path out as a chain in a fresh cache and runs verify_attention with no mask; prints
the largest difference (zero up to rounding) and the time of one tree pass against the per-path passes.
"""
import argparse
import time

import torch

from fastvlm_kernels import verify_attention


def random_tree(num_nodes: int, generator: torch.Generator):
    """Parents (node 0 is the root, parents come first) and the [T] int64 ancestor bitmasks."""
    parents, masks = [-1], [1]
    for node in range(1, num_nodes):
        parent = int(torch.randint(0, node, (1,), generator=generator))
        parents.append(parent)
        masks.append(masks[parent] | (1 << node))
    signed = [mask - (1 << 64) if mask >= 1 << 63 else mask for mask in masks]
    return parents, torch.tensor(signed, dtype=torch.int64)


def path_to(node: int, parents):
    path = []
    while node != -1:
        path.append(node)
        node = parents[node]
    return path[::-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=24)
    parser.add_argument("--prefix", type=int, default=600)
    parser.add_argument("--q-heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    parents, masks = random_tree(args.nodes, generator)
    cache_len = args.prefix + args.nodes
    q = torch.randn(1, args.q_heads, args.nodes, args.head_dim, generator=generator)
    k_cache = torch.randn(1, args.kv_heads, cache_len, args.head_dim, generator=generator)
    v_cache = torch.randn(1, args.kv_heads, cache_len, args.head_dim, generator=generator)
    prefix_lens = torch.tensor([args.prefix])

    start = time.perf_counter()
    tree_out = verify_attention(q, k_cache, v_cache, prefix_lens, masks[None], backend=args.backend)
    tree_seconds = time.perf_counter() - start

    worst, chain_seconds = 0.0, 0.0
    for node in range(args.nodes):
        path = path_to(node, parents)
        positions = list(range(args.prefix)) + [args.prefix + p for p in path]
        chain_k, chain_v = k_cache[:, :, positions], v_cache[:, :, positions]
        start = time.perf_counter()
        chain_out = verify_attention(q[:, :, path], chain_k, chain_v, prefix_lens, backend=args.backend)
        chain_seconds += time.perf_counter() - start
        worst = max(worst, (chain_out[:, :, -1] - tree_out[:, :, node]).abs().max().item())
        print(f"node {node:2d}  depth {len(path) - 1}  path {path}", flush=True)
    print(f"\nlargest difference between a node's tree output and its path's chain output: {worst:.2e}")
    print(f"one tree pass: {tree_seconds * 1e3:.2f} ms; {args.nodes} chain passes: {chain_seconds * 1e3:.2f} ms")
    if worst > 1e-4:
        raise SystemExit("tree attention disagrees with chain attention")


if __name__ == "__main__":
    main()

"""Benchmark the acceptance ops (accept_greedy, accept_sampling and the tree versions).

    python bench/acceptance.py                      # CPU: the C++ kernel vs the reference vs vectorised PyTorch
    python bench/acceptance.py --device cuda        # GPU: cuda and triton vs vectorised PyTorch (device time)
    python bench/acceptance.py --json out.json --md out.md

Baselines: the reference (a Python loop per row: the specification, not a contender) and what a user
would write in vectorised PyTorch for a chain (gather, cumprod, residual, cumsum + searchsorted; no host
synchronisation). CPU: torch.utils.benchmark medians (a shared machine: compare ratios within one run).
GPU: device time per call (bench/_common.py gpu_time_ms: CUDA-graph replay, cold L2, no host overhead). Each configuration is checked against the reference before it is
timed (integer outputs must be equal).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import op_parser, cpu_time_us, gpu_time_ms, environment, format_row, write_results  # noqa: E402
from fastvlm_kernels.ops.acceptance import (BACKENDS, accept_greedy, accept_greedy_reference,  # noqa: E402
                                            accept_sampling, accept_sampling_reference, accept_sampling_tree,
                                            accept_sampling_tree_reference)

BATCHES = (1, 4, 16)
DRAFT_LENGTHS = (4, 8)
VOCABS = (32064, 151936)   # Phi-3-vision / LLaVA-Phi, Qwen2-VL


def make_case(batch, num_drafted, vocab, device, tree=False, seed=0):
    """Draft and target distributions that share most of their mass (both acceptances and rejections
    happen), draft tokens drawn from q, uniforms, and a random tree of num_drafted + 1 nodes if `tree`."""
    generator = torch.Generator().manual_seed(seed)
    num_nodes = num_drafted + 1
    shared = torch.randn(batch, num_nodes, vocab, generator=generator) * 3
    target = torch.softmax(shared + torch.randn(batch, num_nodes, vocab, generator=generator), -1)
    draft = torch.softmax(shared[:, :num_drafted] + torch.randn(batch, num_drafted, vocab, generator=generator), -1)
    if tree:
        parents = torch.tensor([[-1] + [int(torch.randint(0, j, (1,), generator=generator))
                                        for j in range(1, num_nodes)] for _ in range(batch)])
    else:
        parents = torch.arange(-1, num_drafted).expand(batch, num_nodes)
    tokens = torch.zeros(batch, num_nodes, dtype=torch.int64)
    for node in range(1, num_nodes):
        tokens[:, node] = torch.multinomial(draft[torch.arange(batch), parents[:, node]], 1, generator=generator)[:, 0]
    uniforms = torch.rand(batch, num_nodes, generator=generator)
    drafts = tokens if tree else tokens[:, 1:].contiguous()
    moved = [t.to(device) for t in (drafts, draft, target, uniforms)]
    return (*moved, parents.contiguous().to(device) if tree else None)


def vectorised_chain_sampling(draft_tokens, draft_probs, target_probs, uniforms):
    """Chain rejection sampling as a user would write it in PyTorch (same uniforms; fp32 sums)."""
    batch, num_drafted = draft_tokens.shape
    rows = torch.arange(batch, device=draft_tokens.device)
    p_drafted = target_probs[:, :num_drafted].gather(-1, draft_tokens[..., None])[..., 0]
    q_drafted = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
    accepted = (uniforms[:, :num_drafted] * q_drafted < p_drafted).int()
    accept_len = accepted.cumprod(1).sum(1)
    p_last = target_probs[rows, accept_len]
    q_last = draft_probs[rows, accept_len.clamp(max=max(num_drafted - 1, 0))]
    residual = torch.where((accept_len < num_drafted)[:, None], (p_last - q_last).clamp_min(0), p_last)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual, p_last)
    cumulative = residual.cumsum(-1)
    token = torch.searchsorted(cumulative, uniforms[:, -1:] * cumulative[:, -1:], right=True)
    token = token.clamp(max=cumulative.shape[1] - 1)
    emitted = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], 1)
    emitted = torch.where(torch.arange(num_drafted + 1, device=emitted.device) < accept_len[:, None], emitted, -1)
    emitted.scatter_(1, accept_len[:, None], token)
    return accept_len, emitted


def usable(name, device):
    backend = {b.name: b for b in BACKENDS}[name]
    return not backend.not_supported_reasons(torch.empty(1, 1, dtype=torch.int64, device=device),
                                             torch.empty(1, 1, 1, device=device))


def check(got, expected, what):
    for got_tensor, expected_tensor in zip(got, expected):
        if not torch.equal(got_tensor.cpu(), expected_tensor.cpu()):
            raise SystemExit(f"{what} disagrees with the reference")


def cases():
    for batch in BATCHES:
        for num_drafted in DRAFT_LENGTHS:
            yield "greedy", batch, num_drafted, 0
            for vocab in VOCABS:
                yield "sampling", batch, num_drafted, vocab
                yield "sampling_tree", batch, 2 * num_drafted, vocab   # a tree of 2k + 1 nodes


def run_case(op, batch, num_drafted, vocab, device, backends, timer, with_reference):
    row = dict(op=op, B=batch, k_or_nodes=num_drafted, V=vocab)
    if op == "greedy":
        generator = torch.Generator().manual_seed(batch)
        drafts = torch.randint(0, 3, (batch, num_drafted), generator=generator).to(device)
        targets = torch.randint(0, 3, (batch, num_drafted + 1), generator=generator).to(device)
        expected = accept_greedy_reference(drafts, targets)
        call = {name: (lambda name=name: accept_greedy(drafts, targets, validate=False, backend=name))
                for name in backends}
        reference = lambda: accept_greedy_reference(drafts, targets)  # noqa: E731
    else:
        tree = op == "sampling_tree"
        drafts, draft_probs, target_probs, uniforms, parents = make_case(batch, num_drafted, vocab, device, tree)
        if tree:
            expected = accept_sampling_tree_reference(drafts, parents, draft_probs, target_probs, uniforms)
            call = {name: (lambda name=name: accept_sampling_tree(drafts, parents, draft_probs, target_probs,
                                                                  uniforms=uniforms, validate=False, backend=name))
                    for name in backends}
            reference = lambda: accept_sampling_tree_reference(drafts, parents, draft_probs, target_probs,  # noqa: E731
                                                               uniforms)
        else:
            expected = accept_sampling_reference(drafts, draft_probs, target_probs, uniforms)
            call = {name: (lambda name=name: accept_sampling(drafts, draft_probs, target_probs, uniforms=uniforms,
                                                             validate=False, backend=name)) for name in backends}
            reference = lambda: accept_sampling_reference(drafts, draft_probs, target_probs, uniforms)  # noqa: E731
            row["vectorised_torch_us"] = timer(lambda: vectorised_chain_sampling(drafts, draft_probs, target_probs,
                                                                                 uniforms))
        row["mean_accept_len"] = float(expected[0].float().mean())
    for name, fn in call.items():
        got = fn()
        check(got, expected, f"{op} {name} B={batch} k={num_drafted} V={vocab}")
        row[f"{name}_us"] = timer(fn)
    if with_reference:
        row["reference_us"] = timer(reference)
    first = next(iter(call), None)
    if first is not None:
        for baseline in ("reference_us", "vectorised_torch_us"):
            if baseline in row:
                row[f"{first}_speedup_vs_{baseline[:-3]}"] = row[baseline] / row[f"{first}_us"]
    return row


def run(args):
    device = args.device
    if device == "cpu":
        backends = ["cpu"] if usable("cpu", "cpu") else []
        timer = lambda fn: cpu_time_us(fn, args.min_time)  # noqa: E731
    else:
        backends = [name for name in ("cuda", "triton") if usable(name, "cuda")]
        timer = lambda fn: 1e3 * gpu_time_ms(fn)  # noqa: E731
    rows = []
    all_cases = list(cases())
    for index, (op, batch, num_drafted, vocab) in enumerate(all_cases):
        row = run_case(op, batch, num_drafted, vocab, device, backends, timer,
                       with_reference=not args.skip_reference and (device == "cpu" or batch == 1))
        rows.append(row)
        print(f"[{index + 1}/{len(all_cases)}] " + format_row(row), flush=True)
    return rows


def main():
    parser = op_parser(__doc__.splitlines()[0], min_time=0.2)
    parser.add_argument("--skip-reference", action="store_true", help="do not time the slow reference")
    args = parser.parse_args()

    env = environment(args.device)
    print(f"acceptance on {env['device']} (torch {env['torch']}, {env['threads']} threads)", flush=True)
    rows = run(args)
    write_results(args, env, rows, "acceptance", "times in µs (medians)")


if __name__ == "__main__":
    main()

"""The draft head over a vocabulary subset vs the full head, on SmolLM2-135M-Instruct's real LM head.

    python bench/draft_vocab.py [--size 4096] [--threads 1] [--responses build/smollm2_data/responses/train.jsonl]

Times early_exit_head (argmax, the fused final norm + head + argmax the greedy draft runs; backend "auto":
the C++ kernel when built) for one row over the full 49,152-row head and over the ``--size`` most frequent
answer tokens of the responses caches (``vocab_subset_from_responses``; without a cache, ids spread evenly).
Full and subset calls alternate and the medians are compared (timings on a shared machine drift). Also
shows the subset head on a contiguous copy of its rows (what a gathered-weight head would cost).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastvlm_kernels.imitation.data import vocab_subset_from_responses  # noqa: E402
from fastvlm_kernels.ops.lm_head import early_exit_head  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--responses", type=Path, nargs="*",
                        default=[Path("build/smollm2_data/responses/train.jsonl"),
                                 Path("build/smollm2_data/responses/heldout.jsonl")])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fastvlm_kernels.models import smollm2
    model, tokenizer = smollm2.load()
    weight, norm = model.lm_head.weight.detach(), model.model.norm.weight.detach()
    eps = float(model.config.rms_norm_eps)
    vocab = weight.shape[0]
    caches = [path for path in args.responses if path.is_file()]
    if caches:
        subset = vocab_subset_from_responses(caches, vocab, args.size, always_include=[tokenizer.eos_token_id])
        source = ", ".join(str(path) for path in caches)
    else:
        subset = torch.linspace(0, vocab - 1, args.size).long().unique()
        source = "evenly spread ids (no responses cache found)"
    rows = weight.index_select(0, subset).contiguous()
    hidden = torch.randn(1, weight.shape[1]) * 3
    calls = {
        "full head": lambda: early_exit_head(hidden, norm, weight, eps=eps),
        f"subset ({subset.numel()} ids, vocab_subset)": lambda: early_exit_head(hidden, norm, weight, eps=eps,
                                                                                vocab_subset=subset, validate=False),
        f"subset ({subset.numel()} rows, contiguous copy)": lambda: early_exit_head(hidden, norm, rows, eps=eps),
    }
    times = {name: [] for name in calls}
    for _ in range(10):
        for call in calls.values():
            call()
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    full = statistics.median(times["full head"])
    print(f"SmolLM2-135M LM head {vocab}x{weight.shape[1]} fp32, 1 row, {torch.get_num_threads()} thread(s); "
          f"subset from {source}")
    print(f"{'head':45s} {'median ms':>10s} {'vs full':>8s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:45s} {median * 1e3:10.3f} {full / median:7.1f}x")


if __name__ == "__main__":
    main()

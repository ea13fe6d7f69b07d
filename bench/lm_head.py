"""Benchmark the fused LM heads against the chain a user would otherwise write.

    python bench/lm_head.py                      # CPU: the C++ kernel vs RMSNorm + F.linear + argmax / multinomial
    python bench/lm_head.py --device cuda        # GPU: every backend vs F.linear + argmax (+ FlashInfer's sampler)
    python bench/lm_head.py --json out.json --md out.md

CPU: the kernel and the reference chain are timed alternately (one call each, repeated), and the medians
compared, because timings on a shared machine drift; compare ratios, not absolute times. GPU:
device time per call (_common.gpu_time_ms: CUDA-graph replay, cold L2, no host overhead), µs and the % of the measured copy bandwidth that reading the head's
weight once at that speed represents (the goal is >= 85%).
Each configuration is checked against the reference chain before it is timed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import (op_parser, alternate, copy_bandwidth_gbps, gpu_time_ms, environment, format_row,  # noqa: E402
                     same_size_read_us, span, write_results)
from fastvlm_kernels.ops.lm_head import BACKENDS, _prepare, early_exit_head, verify_head  # noqa: E402

# (name, V, H): LLaVA-1.5 / Phi-3 heads, Qwen2-VL-7B's, SmolLM2-135M's (the real model of models.smollm2).
HEADS = [("32064x4096", 32064, 4096), ("151936x3584", 151936, 3584), ("49152x576", 49152, 576)]
ROWS = (1, 5, 17, 65)
EPS = 1e-6


def make_case(vocab, hidden_size, num_rows, dtype, device):
    generator = torch.Generator().manual_seed(vocab + num_rows)
    weight = torch.empty(vocab, hidden_size, dtype=dtype, device=device)
    for start in range(0, vocab, 16384):   # filled in chunks: no fp32 copy of a large head
        chunk = torch.randn(min(16384, vocab - start), hidden_size, generator=generator) / hidden_size ** 0.5
        weight[start:start + chunk.shape[0]] = chunk.to(device, dtype)
    norm_weight = (torch.rand(hidden_size, generator=generator) + 0.5).to(device, dtype)
    hidden = torch.randn(num_rows, hidden_size, generator=generator).to(device, dtype)
    return hidden, norm_weight, weight


def reference_logits(hidden, norm_weight, weight):
    """What a user writes: the model's RMSNorm, then the LM head as F.linear (logits [M, V])."""
    x = hidden.float()
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * norm_weight.float()).to(hidden.dtype)
    return F.linear(normed, weight)


def reference_argmax(hidden, norm_weight, weight):
    return reference_logits(hidden, norm_weight, weight).argmax(-1)


def reference_sample(hidden, norm_weight, weight, temperature=0.8):
    probs = torch.softmax(reference_logits(hidden, norm_weight, weight).float() / temperature, dim=-1)
    return torch.multinomial(probs, 1)[:, 0]


def usable(backend_name, hidden, norm_weight, weight, mode="argmax"):
    call = _prepare(hidden, norm_weight, weight, eps=EPS, mode=mode, temperature=0.8, top_k=None, top_p=None,
                    vocab_subset=None, generator=None, seed=0 if mode == "sample" else None, norm_offset=0.0,
                    logit_scale=1.0, logit_softcap=None, draft_tokens=None, prob_rows=None, validate=False)
    return not {b.name: b for b in BACKENDS}[backend_name].not_supported_reasons(call)


def check(hidden, norm_weight, weight, backend):
    """The kernel's argmax equals the chain's on rows where the chain's top-2 gap exceeds rounding."""
    logits = reference_logits(hidden, norm_weight, weight).float()
    top2 = torch.topk(logits, 2, dim=-1).values
    got = early_exit_head(hidden, norm_weight, weight, eps=EPS, backend=backend).tokens
    safe = (top2[:, 0] - top2[:, 1]) > 0.05
    if (safe & (got != logits.argmax(-1))).any():
        raise SystemExit(f"{backend} disagrees with F.linear + argmax")


def run_cpu(args):
    rows = []
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    heads = [head for head in HEADS if args.heads is None or head[0] in args.heads]
    for dtype_name, dtype in dtypes.items():
        for head_name, vocab, hidden_size in heads:
            for num_rows in ROWS:
                hidden, norm_weight, weight = make_case(vocab, hidden_size, num_rows, dtype, "cpu")
                check(hidden, norm_weight, weight, "cpu")
                seed = torch.tensor([1, 0])
                medians = alternate({
                    "ref_argmax": lambda: reference_argmax(hidden, norm_weight, weight),
                    "cpu_argmax": lambda: early_exit_head(hidden, norm_weight, weight, eps=EPS, backend="cpu"),
                    "ref_sample": lambda: reference_sample(hidden, norm_weight, weight),
                    "cpu_sample": lambda: early_exit_head(hidden, norm_weight, weight, eps=EPS, mode="sample",
                                                          temperature=0.8, seed=seed, backend="cpu"),
                }, repeats=args.repeats, min_time=args.min_time)
                row = dict(dtype=dtype_name, head=head_name, M=num_rows,
                           **{f"{name}_ms": 1e3 * value for name, value in medians.items()})
                row["speedup_argmax"] = medians["ref_argmax"] / medians["cpu_argmax"]
                row["speedup_sample"] = medians["ref_sample"] / medians["cpu_sample"]
                row["cpu_argmax_gbps"] = weight.numel() * weight.element_size() / medians["cpu_argmax"] / 1e9
                rows.append(row)
                print(format_row(row), flush=True)
                del hidden, norm_weight, weight
    return rows


def run_gpu(args):

    device = "cuda"
    copy_gbps = copy_bandwidth_gbps("cuda")
    try:
        import flashinfer.sampling as flashinfer_sampling
    except ImportError:
        flashinfer_sampling = None
    rows = []
    for dtype_name, dtype in {"bf16": torch.bfloat16, "fp16": torch.float16}.items():
        for head_name, vocab, hidden_size in HEADS:
            for num_rows in ROWS:
                hidden, norm_weight, weight = make_case(vocab, hidden_size, num_rows, dtype, device)
                weight_bytes = weight.numel() * weight.element_size()
                row = dict(dtype=dtype_name, head=head_name, M=num_rows, copy_gbps=copy_gbps)
                row["same_size_read_us"] = same_size_read_us(weight_bytes)
                row["linear_argmax_us"] = 1e3 * gpu_time_ms(
                    lambda: reference_argmax(hidden, norm_weight, weight))
                if flashinfer_sampling is not None:
                    def flashinfer_chain():
                        probs = torch.softmax(reference_logits(hidden, norm_weight, weight).float() / 0.8, -1)
                        return flashinfer_sampling.sampling_from_probs(probs)
                    row["linear_flashinfer_sample_us"] = 1e3 * gpu_time_ms(flashinfer_chain)
                draft = torch.zeros(num_rows, dtype=torch.int64, device=device)
                seed = torch.tensor([1, 0], device=device)
                for backend in ("cuda", "triton"):
                    if not usable(backend, hidden, norm_weight, weight):
                        continue
                    check(hidden, norm_weight, weight, backend)
                    argmax_us = 1e3 * gpu_time_ms(
                        lambda: early_exit_head(hidden, norm_weight, weight, eps=EPS, backend=backend))
                    sample_us = 1e3 * gpu_time_ms(
                        lambda: early_exit_head(hidden, norm_weight, weight, eps=EPS, mode="sample", seed=seed,
                                                temperature=0.8, backend=backend))
                    verify_us = 1e3 * gpu_time_ms(
                        lambda: verify_head(hidden, norm_weight, weight, draft, eps=EPS, validate=False,
                                            backend=backend))
                    row[f"{backend}_argmax_us"] = argmax_us
                    row[f"{backend}_sample_us"] = sample_us
                    row[f"{backend}_verify_us"] = verify_us
                    row[f"{backend}_argmax_pct_copy"] = 100 * weight_bytes / argmax_us / 1e3 / copy_gbps
                    row[f"{backend}_argmax_pct_same_size_read"] = 100 * row["same_size_read_us"] / argmax_us
                    row[f"{backend}_speedup_vs_linear"] = row["linear_argmax_us"] / argmax_us
                rows.append(row)
                print(format_row(row), flush=True)
                del hidden, norm_weight, weight
    return rows


def main():
    parser = op_parser(__doc__.splitlines()[0], min_time=1.0)
    parser.add_argument("--repeats", type=int, default=7, help="CPU: alternating calls per function (at least)")
    parser.add_argument("--heads", nargs="+", choices=[head[0] for head in HEADS], help="only these heads")
    args = parser.parse_args()

    env = environment(args.device)
    print(f"lm_head on {env['device']} (torch {env['torch']}, {env['threads']} threads)", flush=True)
    rows = run_cpu(args) if args.device == "cpu" else run_gpu(args)
    write_results(args, env, rows, "lm_head", "times are medians")
    if args.device == "cpu" and rows:
        worst = min(min(row["speedup_argmax"], row["speedup_sample"]) for row in rows)
        small = [row["speedup_argmax"] for row in rows if row["M"] in (5, 17)]
        print(f"\nCPU backend (C++ kernel; fp32 argmax from 40 rows: chunked GEMM) vs the reference chain: "
              f"worst {worst:.2f}x; argmax at M = 5, 17: worst {min(small):.2f}x "
              "(targets: >= 1x everywhere, >= 1.5x at M = 5 and 17)")
    if args.device == "cuda":
        for backend in ("cuda", "triton"):
            if rows and f"{backend}_argmax_us" in rows[0]:
                print(f"{backend} argmax: {span(rows, f'{backend}_argmax_pct_copy')}% of copy bandwidth, "
                      f"{span(rows, f'{backend}_argmax_pct_same_size_read')}% of a same-size read "
                      "(goal: >= 85% of copy bandwidth)")


if __name__ == "__main__":
    main()

"""Where the GPU time of the hot ops goes: per-kernel device time (torch.profiler) for each backend,
next to the whole call's time with and without a CUDA graph (graph replay removes the host's launch
overhead, so the gap between the two is Python + launch cost, not kernel time).

    python bench/profile_gpu.py                  # prints a table, writes --json
    ncu --section SpeedOfLight --section Occupancy --section LaunchStats -k regex:verify_attention \
        python bench/profile_gpu.py --only verify_attention --ncu   # one launch per case, for Nsight Compute

Use it before changing a kernel: it says whether a slow figure in bench/*.py is the kernel itself or
the launch path around it.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastvlm_kernels.ops.lm_head import early_exit_head  # noqa: E402
from fastvlm_kernels.ops.verify_attention import verify_attention  # noqa: E402

# (label, B, Hq, Hkv, D, prefix, T, tree)
ATTENTION_CASES = [
    ("mha32 B1 L4096 T1", 1, 32, 32, 128, 4096, 1, False),
    ("mha32 B1 L4096 T16 tree", 1, 32, 32, 128, 4096, 16, True),
    ("mha32 B1 L8192 T8", 1, 32, 32, 128, 8192, 8, False),
    ("gqa28/4 B1 L4096 T4", 1, 28, 4, 128, 4096, 4, False),
    ("gqa28/4 B4 L1024 T4", 4, 28, 4, 128, 1024, 4, False),
    ("gqa28/4 B4 L8192 T64", 4, 28, 4, 128, 8192, 64, False),
]
# (label, V, H, M, mode)
HEAD_CASES = [
    ("151936x3584 M1 argmax", 151936, 3584, 1, "argmax"),
    ("151936x3584 M5 argmax", 151936, 3584, 5, "argmax"),
    ("151936x3584 M17 argmax", 151936, 3584, 17, "argmax"),
    ("151936x3584 M64 argmax", 151936, 3584, 64, "argmax"),
    ("151936x3584 M5 sample", 151936, 3584, 5, "sample"),
    ("32064x4096 M5 argmax", 32064, 4096, 5, "argmax"),
]


def attention_call(case, backend, device):
    _, batch, num_q_heads, num_kv_heads, head_dim, prefix, num_new, tree = case
    generator = torch.Generator(device=device).manual_seed(prefix + num_new)
    q = torch.randn(batch, num_q_heads, num_new, head_dim, device=device, generator=generator).bfloat16()
    k = torch.randn(batch, num_kv_heads, prefix + num_new, head_dim, device=device, generator=generator).bfloat16()
    v = torch.randn_like(k)
    prefix_lens = torch.full((batch,), prefix, dtype=torch.int32, device=device)
    mask = None
    if tree:
        rows = [(1 << (j + 1)) - 1 for j in range(num_new)]
        mask = torch.tensor(rows, dtype=torch.int64, device=device).expand(batch, num_new).contiguous()
    out = torch.empty_like(q)
    bytes_read = 2 * k.numel() * k.element_size()
    if backend == "sdpa":
        from torch.nn.functional import scaled_dot_product_attention
        from fastvlm_kernels.ops.verify_attention.reference import visibility_mask
        visible = visibility_mask(prefix_lens, mask, num_new, k.shape[2])[:, None]
        return (lambda: scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)), bytes_read
    return (lambda: verify_attention(q, k, v, prefix_lens, mask, out=out, validate=False, backend=backend)), bytes_read


def head_call(case, backend, device):
    _, vocab, hidden_size, rows, mode = case
    generator = torch.Generator(device=device).manual_seed(vocab + rows)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator) / hidden_size ** 0.5).half()
    norm = (torch.rand(hidden_size, device=device, generator=generator) + 0.5).half()
    hidden = torch.randn(rows, hidden_size, device=device, generator=generator).half()
    bytes_read = weight.numel() * weight.element_size()
    if backend == "linear":
        def chain():
            x = hidden.float()
            normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.float()).half()
            return torch.nn.functional.linear(normed, weight).argmax(-1)
        return chain, bytes_read
    if mode == "sample":
        seed = torch.tensor([7, 0], dtype=torch.int64, device=device)
        return (lambda: early_exit_head(hidden, norm, weight, eps=1e-6, mode="sample", temperature=0.8, seed=seed,
                                        backend=backend)), bytes_read
    return (lambda: early_exit_head(hidden, norm, weight, eps=1e-6, mode=mode, backend=backend)), bytes_read


def graph_time_us(fn, iters=20):
    """Device time per call with the host out of the way: the calls replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
    except Exception as error:  # noqa: BLE001 - a backend that cannot be captured is reported, not fatal
        return f"not capturable: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * iters)


def eager_time_us(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def kernel_times_us(fn, iters=10):
    """Device time per call of each kernel the call launches, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:60]] += event.device_time / iters
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def host_profile():
    import cProfile
    import pstats
    for make, case, backends in ((attention_call, ATTENTION_CASES[3], ("cuda", "triton")),
                                 (head_call, HEAD_CASES[1], ("cuda", "triton"))):
        for backend in backends:
            fn, _ = make(case, backend, "cuda")
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(200):
                fn()
            profiler.disable()
            torch.cuda.synchronize()
            print(f"\n== host time of 200 eager calls: {case[0]}, {backend}", flush=True)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("verify_attention", "lm_head"))
    parser.add_argument("--ncu", action="store_true", help="one call per case and backend, nothing timed")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--host-profile", action="store_true",
                        help="cProfile 200 eager calls of each backend on one case per op: where the host time goes")
    args = parser.parse_args()
    if args.host_profile:
        host_profile()
        return
    device = "cuda"
    rows = []
    suites = []
    if args.only in (None, "verify_attention"):
        suites.append(("verify_attention", ATTENTION_CASES, attention_call, ("sdpa", "cuda", "triton")))
    if args.only in (None, "lm_head"):
        suites.append(("lm_head", HEAD_CASES, head_call, ("linear", "cuda", "triton")))
    for op, cases, make, backends in suites:
        for case in cases:
            for backend in backends:
                fn, bytes_read = make(case, backend, device)
                if args.ncu:
                    fn()
                    torch.cuda.synchronize()
                    continue
                row = dict(op=op, case=case[0], backend=backend, eager_us=eager_time_us(fn))
                row["graph_us"] = graph_time_us(fn)
                row["kernels_us"] = kernel_times_us(fn)
                device_us = sum(row["kernels_us"].values())
                row["device_us"] = device_us
                row["device_gbps"] = bytes_read / device_us / 1e3 if device_us else None
                rows.append(row)
                graph = row["graph_us"]
                graph_text = f"{graph:8.1f}" if isinstance(graph, float) else graph
                print(f"{op:16s} {case[0]:26s} {backend:7s} eager {row['eager_us']:8.1f} us  graph {graph_text}  "
                      f"kernels {device_us:8.1f} us ({row['device_gbps'] or 0:6.0f} GB/s)", flush=True)
                for name, micros in row["kernels_us"].items():
                    print(f"      {micros:8.1f} us  {name}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                             rows=rows), indent=1))


if __name__ == "__main__":
    main()

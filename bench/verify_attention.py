"""Benchmark verify_attention against what a user would otherwise write.

    python bench/verify_attention.py                      # CPU: the C++ kernel vs SDPA with a mask vs the reference
    python bench/verify_attention.py --device cuda        # GPU: every backend vs SDPA / flash-attn / FlashInfer
    python bench/verify_attention.py --json out.json --md out.md
    python bench/verify_attention.py --host-overhead       # host µs per call: kernel, plan.run, public call

CPU: medians of single calls, SDPA and the public call called in turns at the process's thread count (compare
ratios within one run: timings on a shared 2-core machine drift); the reference by torch.utils.benchmark.
GPU: device time per call (_common.gpu_time_ms: CUDA-graph replay, cold L2, no host overhead), with GB/s and %
of the measured copy bandwidth (the kernel is memory bound: it must read the cache once per KV head).
Each configuration is checked against the reference before it is timed.
--host-overhead: host time per call of each way through, per backend: the backend's kernel called directly, a
held plan's run (what the decoder calls per layer) and the public call (plan + run), batches of calls in turns;
on CUDA at a decode step's shape without synchronising (launch cost), on CPU at a tiny shape on one thread.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import (op_parser, alternate, copy_bandwidth_gbps, cpu_time_us, gpu_time_ms, environment,  # noqa: E402
                     format_row, same_size_read_us, span, write_results)
from fastvlm_kernels.ops.verify_attention import (BACKENDS, verify_attention, verify_attention_plan,  # noqa: E402
                                                  verify_attention_reference)
from fastvlm_kernels.ops.verify_attention.reference import visibility_mask  # noqa: E402

# (name, Hq, Hkv, D): MHA like LLaVA-1.5-7B's Llama-2, GQA like Qwen2-VL-7B's Qwen2.
HEAD_SHAPES = [("mha-8", 8, 8, 128), ("gqa-28/4", 28, 4, 128)]
GPU_HEAD_SHAPES = [("llava-1.5-7b", 32, 32, 128), ("qwen2-vl-7b", 28, 4, 128)]
CPU_PREFIXES = (1024, 4096)
GPU_PREFIXES = (1024, 2048, 4096, 8192)
NEW_TOKENS = (1, 4, 8, 16, 64)


def chain_mask(batch: int, num_new: int, device) -> torch.Tensor:
    rows = [(1 << (j + 1)) - 1 if j < 63 else -1 for j in range(num_new)]
    return torch.tensor(rows, dtype=torch.int64, device=device).expand(batch, num_new).contiguous()


def make_case(batch, num_q_heads, num_kv_heads, head_dim, prefix, num_new, dtype, device):
    generator = torch.Generator(device="cpu").manual_seed(prefix * 131 + num_new)
    cache_len = prefix + num_new
    q = torch.randn(batch, num_q_heads, num_new, head_dim, generator=generator).to(device, dtype)
    k_cache = torch.randn(batch, num_kv_heads, cache_len, head_dim, generator=generator).to(device, dtype)
    v_cache = torch.randn(batch, num_kv_heads, cache_len, head_dim, generator=generator).to(device, dtype)
    prefix_lens = torch.full((batch,), prefix, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, prefix_lens


def sdpa_with_mask(q, k_cache, v_cache, attn_mask):
    """What a user writes without this package: SDPA over the cache with an explicit boolean mask."""
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=attn_mask, enable_gqa=True)


def usable(backend_name, q):
    backend = {b.name: b for b in BACKENDS}[backend_name]
    return not backend.not_supported_reasons(q)


def check(q, k_cache, v_cache, prefix_lens, backend):
    expected, _ = verify_attention_reference(q, k_cache, v_cache, prefix_lens)
    got = verify_attention(q, k_cache, v_cache, prefix_lens, backend=backend)
    error = (got.float() - expected.float()).abs().max().item()
    limit = 1e-4 if q.dtype == torch.float32 else 3e-2
    if not error <= limit:
        raise SystemExit(f"{backend} disagrees with the reference: max abs error {error:.3g} > {limit}")


def run_cpu(args):
    rows = []
    dtypes = {name: dtype for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
              if name in args.dtypes}
    total = len(HEAD_SHAPES) * len(args.prefixes) * len(args.new_tokens) * len(dtypes)
    for dtype_name, dtype in dtypes.items():
        for shape_name, num_q_heads, num_kv_heads, head_dim in HEAD_SHAPES:
            for prefix in args.prefixes:
                for num_new in args.new_tokens:
                    q, k_cache, v_cache, prefix_lens = make_case(1, num_q_heads, num_kv_heads, head_dim,
                                                                 prefix, num_new, dtype, "cpu")
                    mask = visibility_mask(prefix_lens, None, num_new, k_cache.shape[2])[:, None]
                    row = dict(dtype=dtype_name, shape=shape_name, Hq=num_q_heads, Hkv=num_kv_heads, D=head_dim,
                               prefix=prefix, T=num_new)
                    timed = {"sdpa_mask_us": lambda: sdpa_with_mask(q, k_cache, v_cache, mask)}
                    if usable("cpu", q):
                        check(q, k_cache, v_cache, prefix_lens, "cpu")
                        # As a user calls it: auto picks the C++ kernel, the values are checked.
                        timed["cpu_us"] = lambda: verify_attention(q, k_cache, v_cache, prefix_lens)
                    medians = alternate(timed, repeats=10, min_time=args.min_time, max_calls=5000)
                    row.update({name: seconds * 1e6 for name, seconds in medians.items()})
                    if "cpu_us" in row:
                        row["speedup_vs_sdpa"] = row["sdpa_mask_us"] / row["cpu_us"]
                    if not args.skip_reference:
                        row["reference_us"] = cpu_time_us(
                            lambda: verify_attention_reference(q, k_cache, v_cache, prefix_lens), args.min_time)
                    rows.append(row)
                    print(f"[{len(rows)}/{total}] " + format_row(row), flush=True)
    return rows


def run_gpu(args):

    device = "cuda"
    rows = []
    copy_gbps = copy_bandwidth_gbps("cuda")
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None
    backends = [name for name in ("cuda", "triton") if usable(name, torch.empty(1, 1, 1, 64, device=device,
                                                                                 dtype=torch.float16))]
    dtype = torch.bfloat16
    for shape_name, num_q_heads, num_kv_heads, head_dim in GPU_HEAD_SHAPES:
        for batch in (1, 4):
            for prefix in GPU_PREFIXES:
                for num_new in NEW_TOKENS:
                    for tree in (False, True) if num_new > 1 else (False,):
                        q, k_cache, v_cache, prefix_lens = make_case(batch, num_q_heads, num_kv_heads, head_dim,
                                                                     prefix, num_new, dtype, device)
                        tree_mask = chain_mask(batch, num_new, device) if tree else None
                        mask = visibility_mask(prefix_lens, tree_mask, num_new, k_cache.shape[2])[:, None]
                        bytes_moved = (2 * k_cache.numel() + 2 * q.numel()) * q.element_size()
                        row = dict(dtype="bf16", shape=shape_name, B=batch, Hq=num_q_heads, Hkv=num_kv_heads,
                                   D=head_dim, prefix=prefix, T=num_new, mask="tree" if tree else "chain",
                                   copy_gbps=copy_gbps)
                        row["same_size_read_us"] = same_size_read_us(bytes_moved)
                        row["sdpa_mask_us"] = 1e3 * gpu_time_ms(
                            lambda: sdpa_with_mask(q, k_cache, v_cache, mask))
                        if flash_attn_with_kvcache is not None and not tree:
                            q_fa, k_fa, v_fa = (t.transpose(1, 2) for t in (q, k_cache, v_cache))
                            seqlens = prefix_lens + num_new
                            row["flash_attn_us"] = 1e3 * gpu_time_ms(
                                lambda: flash_attn_with_kvcache(q_fa, k_fa, v_fa, cache_seqlens=seqlens, causal=True))
                        for backend in backends:
                            check(q, k_cache, v_cache, prefix_lens, backend)
                            microseconds = 1e3 * gpu_time_ms(
                                lambda: verify_attention(q, k_cache, v_cache, prefix_lens, tree_mask,
                                                         validate=False, backend=backend))
                            row[f"{backend}_us"] = microseconds
                            row[f"{backend}_gbps"] = bytes_moved / microseconds / 1e3
                            row[f"{backend}_pct_copy"] = 100 * row[f"{backend}_gbps"] / copy_gbps
                            row[f"{backend}_pct_same_size_read"] = 100 * row["same_size_read_us"] / microseconds
                            row[f"{backend}_speedup_vs_sdpa"] = row["sdpa_mask_us"] / microseconds
                        rows.append(row)
                        print(format_row(row), flush=True)
    return rows


HOST_CALLS = 200   # calls per timed batch: a host cost of a few µs is well above the clock's resolution


def run_host_overhead(args):
    device = args.device
    if device == "cpu":   # a tiny problem on one thread: the kernel's own time (and thread wake-ups) out of the way
        torch.set_num_threads(1)
        dtype, (num_q_heads, num_kv_heads, head_dim, prefix) = torch.float32, (4, 2, 64, 16)
    else:
        dtype, (num_q_heads, num_kv_heads, head_dim, prefix) = torch.bfloat16, (32, 8, 128, 256)
    q, k_cache, v_cache, prefix_lens = make_case(1, num_q_heads, num_kv_heads, head_dim, prefix, 1, dtype, device)
    out = torch.empty_like(q)
    rows = []
    for backend in [name for name in ("cuda", "triton", "cpu") if usable(name, q)]:
        check(q, k_cache, v_cache, prefix_lens, backend)
        plan = verify_attention_plan(q, k_cache, v_cache, prefix_lens, validate=False, backend=backend)
        kernel = plan.backend.run
        ways = {
            "kernel_us": lambda: kernel(q, k_cache, v_cache, prefix_lens, None, plan.sm_scale, out, None),
            "plan_run_us": lambda: plan.run(q, k_cache, v_cache, prefix_lens, out=out),
            "public_us": lambda: verify_attention(q, k_cache, v_cache, prefix_lens, out=out, validate=False,
                                                  backend=backend),
        }
        if backend == "cpu":   # the plain call: auto, no out, lengths checked (the C++ entry on CPU tensors)
            ways["public_plain_us"] = lambda: verify_attention(q, k_cache, v_cache, prefix_lens)
        batches = {name: (lambda way=way: [way() for _ in range(HOST_CALLS)]) for name, way in ways.items()}
        medians = alternate(batches, repeats=20, min_time=args.min_time, max_calls=500)
        if device == "cuda":
            torch.cuda.synchronize()
        row = dict(backend=backend, dtype=str(dtype).replace("torch.", ""),
                   shape=f"B1-Hq{num_q_heads}-Hkv{num_kv_heads}-D{head_dim}-P{prefix}-T1")
        row.update({name: seconds * 1e6 / HOST_CALLS for name, seconds in medians.items()})
        row["plan_run_overhead_us"] = row["plan_run_us"] - row["kernel_us"]
        row["public_overhead_us"] = row["public_us"] - row["kernel_us"]
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def main():
    parser = op_parser(__doc__.splitlines()[0], min_time=0.2)
    parser.add_argument("--prefixes", type=int, nargs="+", default=list(CPU_PREFIXES), help="CPU: prefix lengths")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=list(NEW_TOKENS), help="CPU: values of T")
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--skip-reference", action="store_true", help="CPU: do not time the slow reference")
    parser.add_argument("--host-overhead", action="store_true",
                        help="host time per call of the kernel, a plan's run and the public call, per backend")
    args = parser.parse_args()

    env = environment(args.device)
    print(f"verify_attention on {env['device']} (torch {env['torch']}, {env['threads']} threads)", flush=True)
    if args.host_overhead:
        rows = run_host_overhead(args)
        write_results(args, env, rows, "verify_attention host overhead", "host µs per call (medians)")
        return
    rows = run_cpu(args) if args.device == "cpu" else run_gpu(args)
    write_results(args, env, rows, "verify_attention", "times in µs (medians)")
    if args.device == "cpu" and rows and "cpu_us" in rows[0]:
        worst = min(row["speedup_vs_sdpa"] for row in rows)
        gqa_bf16 = [row["speedup_vs_sdpa"] for row in rows if row["dtype"] == "bf16" and row["Hq"] != row["Hkv"]]
        print(f"\nC++ kernel vs SDPA with a mask: worst {worst:.2f}x; GQA bf16 worst "
              f"{min(gqa_bf16):.2f}x (targets: >= 1x everywhere, >= 2x on GQA bf16)")
    if args.device == "cuda":
        goal = [row for row in rows if row["prefix"] >= 2048 and row["T"] <= 16]
        for backend in ("cuda", "triton"):
            if goal and f"{backend}_us" in goal[0]:
                print(f"{backend} at prefix >= 2048, T <= 16: {span(goal, f'{backend}_pct_copy')}% of copy "
                      f"bandwidth, {span(goal, f'{backend}_pct_same_size_read')}% of a same-size read, "
                      f"{min(r[f'{backend}_speedup_vs_sdpa'] for r in goal):.2f}x SDPA at worst "
                      "(goal: >= 80% of copy bandwidth, >= 1.5x)")


if __name__ == "__main__":
    main()

"""Benchmark the KV cache: kv_compact of a 64-node draft tree's accepted path, every layer at once, against
the reference's per-layer index copies; a chain rollback, which moves no bytes; and the append of one
layer's new keys and values (kv_append, one launch, against slice copies and index_put).

    python bench/kv_cache.py                         # CPU: the C++ kernel vs the reference
    python bench/kv_cache.py --device cuda           # GPU: cuda and triton backends vs the reference
    python bench/kv_cache.py --json out.json --md out.md

Shapes: LLaVA-1.5-7B (32 layers, 32 KV heads, D 128) and Qwen2-VL-7B (28 layers, 4 KV heads, D 128), fp16,
a tree of 64 nodes appended after the prompt, accepted paths of 4 and 10 nodes (the root included).
CPU: torch.utils.benchmark medians (compare ratios within one run: the machine is shared). GPU:
device time per call (_common.gpu_time_ms: CUDA-graph replay, cold L2, no host overhead); GB/s counts the bytes moved (read + write of each moved row) and is
compared with a plain copy of the same bytes and with the large-copy bandwidth; the number of kernels one
call launches is counted with the profiler. Every configuration is checked against the reference first.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import (op_parser, copy_bandwidth_gbps, cpu_time_us, gpu_time_ms, environment, format_row,  # noqa: E402
                     markdown)
from fastvlm_kernels import KVCache  # noqa: E402
from fastvlm_kernels.ops.kv_cache import BACKENDS, kv_append, kv_compact  # noqa: E402

# (name, cache layers, KV heads, head dim)
MODELS = [("llava-1.5-7b", 32, 32, 128), ("qwen2-vl-7b", 28, 4, 128)]
TREE_NODES = 64
PATH_LENGTHS = (4, 10)
BATCHES = (1, 4)


def accepted_path(batch: int, path_len: int, seed: int) -> torch.Tensor:
    """[B, 64]: the root, then path_len - 1 increasing nodes of the tree (as a path through a 64-node tree
    lands), -1 padded to the tree's size."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        others = torch.randperm(TREE_NODES - 1, generator=generator)[:path_len - 1].add(1).sort().values.tolist()
        nodes = [0] + others
        rows.append(nodes + [-1] * (TREE_NODES - len(nodes)))
    return torch.tensor(rows, dtype=torch.int32)


def moved_bytes(buffer: torch.Tensor, accepted: torch.Tensor) -> int:
    """Read + write bytes of the rows that move (accepted[j] != j)."""
    nodes = accepted.cpu()
    columns = torch.arange(nodes.shape[1])
    rows_moved = int(((nodes >= 0) & (nodes != columns)).sum())          # over the batch
    num_layers, _, _, heads, _, head_dim = buffer.shape
    return 2 * rows_moved * num_layers * 2 * heads * head_dim * buffer.element_size()


def usable(name: str, buffer: torch.Tensor) -> bool:
    return not {b.name: b for b in BACKENDS}[name].not_supported_reasons(buffer)


def check(buffer, start, accepted, backend):
    expected = buffer.clone()
    kv_compact(expected, start, accepted, backend="torch")
    got = buffer.clone()
    kv_compact(got, start, accepted, backend=backend)
    if not torch.equal(got, expected):
        raise SystemExit(f"{backend} disagrees with the reference")


def chain_rollback_moves_nothing(buffer_device: str, dtype) -> dict:
    """A chain rollback: the buffer is bit-identical before and after, and it takes how long (host side)."""
    cache = KVCache(4, 2, 2, 64, 64, dtype, buffer_device)
    keys = torch.randn(2, 2, 40, 64, device=buffer_device, dtype=dtype)
    for layer in range(4):
        cache.append(layer, keys, keys)
    before = cache.buffer.clone()
    new_lens = torch.tensor([33, 37], dtype=torch.int32, device=buffer_device)
    cache.rollback(new_lens, host_lens=[33, 37])
    changed = int((cache.buffer != before).sum())
    microseconds = cpu_time_us(lambda: cache.rollback(new_lens, host_lens=[33, 37]), 0.2)
    return dict(case="chain rollback", bytes_moved=changed * cache.buffer.element_size(), rollback_us=microseconds)


def cases(device):
    for name, num_layers, heads, head_dim in MODELS:
        for batch in BATCHES:
            for path_len in PATH_LENGTHS:
                prefix = 256 if device == "cpu" else 1024
                cache_len = prefix + TREE_NODES + 8
                torch.manual_seed(path_len + batch)
                buffer = torch.randn(num_layers, 2, batch, heads, cache_len, head_dim, device=device,
                                     dtype=torch.float16)
                start = torch.full((batch,), prefix, dtype=torch.int32, device=device)
                accepted = accepted_path(batch, path_len, seed=batch * 100 + path_len).to(device)
                yield dict(model=name, layers=num_layers, Hkv=heads, B=batch, path=path_len), buffer, start, accepted
                del buffer


def run_cpu(args):
    rows = []
    for row, buffer, start, accepted in cases("cpu"):
        check(buffer, start, accepted, "cpu")
        timer = lambda backend: cpu_time_us(  # noqa: E731
            lambda: kv_compact(buffer, start, accepted, validate=False, backend=backend), args.min_time)
        row["reference_us"] = timer("torch")
        row["cpu_us"] = timer("cpu")
        row["speedup"] = row["reference_us"] / row["cpu_us"]
        row["MB_moved"] = moved_bytes(buffer, accepted) / 1e6
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def kernels_launched(fn) -> int:
    """GPU kernels one call runs (the profiler's CUDA events); -1 when the profiler is unavailable."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for event in prof.events() if event.device_type.name == "CUDA")
    except Exception as error:  # a profiler without CUPTI must not stop the benchmark
        print(f"profiler unavailable: {error}", flush=True)
        return -1


def run_gpu(args):

    copy_gbps = copy_bandwidth_gbps("cuda")
    rows = []
    for row, buffer, start, accepted in cases("cuda"):
        nbytes = moved_bytes(buffer, accepted)
        row["MB_moved"] = nbytes / 1e6
        same_bytes = torch.empty(nbytes // 4, dtype=torch.float16, device="cuda")
        same_out = torch.empty_like(same_bytes)
        same_ms = gpu_time_ms(lambda: same_out.copy_(same_bytes), warmup=25, rep=100)
        row["same_bytes_copy_us"] = same_ms * 1e3
        row["reference_us"] = gpu_time_ms(
            lambda: kv_compact(buffer, start, accepted, validate=False, backend="torch"), warmup=5, rep=50) * 1e3
        for backend in ("cuda", "triton"):
            if not usable(backend, buffer):
                continue
            check(buffer, start, accepted, backend)
            ms = gpu_time_ms(lambda: kv_compact(buffer, start, accepted, validate=False, backend=backend),
                                         warmup=25, rep=200)
            row[f"{backend}_us"] = ms * 1e3
            row[f"{backend}_GBps"] = nbytes / ms / 1e6
            row[f"{backend}_pct_same_size_copy"] = 100 * same_ms / ms
            row[f"{backend}_pct_copy_bw"] = 100 * (nbytes / ms / 1e6) / copy_gbps
            row[f"{backend}_launches"] = kernels_launched(
                lambda: kv_compact(buffer, start, accepted, validate=False, backend=backend))
            row[f"{backend}_speedup"] = row["reference_us"] / row[f"{backend}_us"]
        rows.append(row)
        print(format_row(row), flush=True)
    return rows, copy_gbps


def append_rows(device, timer):
    """One layer's append at LLaVA / Qwen2-VL head shapes: equal rows (slice copy_ vs kv_append) and ragged
    rows (index_put, what plain PyTorch needs, vs kv_append)."""
    rows = []
    for name, _, heads, head_dim in MODELS:
        for batch, num_new in ((1, 1), (4, 1), (4, 9)):
            k_cache = torch.zeros(batch, heads, 2048, head_dim, dtype=torch.float16, device=device)
            v_cache = torch.zeros_like(k_cache)
            keys = torch.randn(batch, heads, num_new, head_dim, device=device).half()
            values = torch.randn_like(keys)
            equal = torch.full((batch,), 1000, dtype=torch.int32, device=device)
            ragged = torch.arange(1000, 1000 + batch, dtype=torch.int32, device=device)
            rows_index = torch.arange(batch, device=device)[:, None]
            steps = torch.arange(num_new, device=device)

            def slice_copy():
                k_cache[:, :, 1000:1000 + num_new].copy_(keys)
                v_cache[:, :, 1000:1000 + num_new].copy_(values)

            def index_put():
                positions = ragged.long()[:, None] + steps
                k_cache[rows_index, :, positions] = keys.transpose(1, 2)
                v_cache[rows_index, :, positions] = values.transpose(1, 2)

            row = dict(case="append", model=name, Hkv=heads, B=batch, T=num_new,
                       slice_copy_us=timer(slice_copy),
                       kv_append_equal_us=timer(lambda: kv_append(k_cache, v_cache, equal, keys, values,
                                                                  validate=False)),
                       index_put_ragged_us=timer(index_put),
                       kv_append_ragged_us=timer(lambda: kv_append(k_cache, v_cache, ragged, keys, values,
                                                                   validate=False)))
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def main():
    parser = op_parser(__doc__.splitlines()[0], min_time=0.3)
    args = parser.parse_args()
    env = environment(args.device)
    print(f"kv_cache on {env['device']} (torch {env['torch']}, {env['threads']} threads)", flush=True)
    chain = chain_rollback_moves_nothing(args.device, torch.float16)
    print(format_row(chain), flush=True)
    if args.device == "cpu":
        rows = run_cpu(args)
        timer = lambda fn: cpu_time_us(fn, args.min_time)  # noqa: E731
    else:
        rows, env["copy_gbps"] = run_gpu(args)
        timer = lambda fn: gpu_time_ms(fn, warmup=25, rep=100) * 1e3  # noqa: E731
    appends = append_rows(args.device, timer)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(environment=env, chain_rollback=chain, rows=rows, append=appends),
                                        indent=1))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(rows, f"# kv_compact on {env['device']}, {env['date']}\n\ntorch {env['torch']}; "
                                          f"times in µs (medians); chain rollback: {chain['bytes_moved']} bytes moved, "
                                          f"{chain['rollback_us']:.1f} µs")
                            + "\n" + markdown(appends, "## append of one layer (µs)"))
    if args.device == "cpu":
        print(f"\nC++ kernel vs per-layer index copies: worst {min(r['speedup'] for r in rows):.1f}x (target >= 3x); "
              f"chain rollback moved {chain['bytes_moved']} bytes")
    else:
        for backend in ("cuda", "triton"):
            pct = [r[f"{backend}_pct_same_size_copy"] for r in rows if f"{backend}_us" in r]
            launches = {r[f"{backend}_launches"] for r in rows if f"{backend}_launches" in r}
            if pct:
                print(f"{backend}: worst {min(pct):.0f}% of a same-size copy (target >= 80%), kernels per call "
                      f"{sorted(launches)} (target [1])")


if __name__ == "__main__":
    main()

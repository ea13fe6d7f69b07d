"""What the tests share: seeds from a test's parameters, the one rule for skipping a backend that cannot run
here (or failing where it must), input builders for the op tests (random data, random draft trees,
poisoning), one torch thread, and loading a recipe program."""
import os
import zlib
from typing import Callable, Optional, Sequence

import pytest
import torch

# CI sets both: a backend CI is meant to check must fail, not skip, when it cannot run.
REQUIRE_EXTENSION = os.environ.get("FASTVLM_REQUIRE_EXTENSION") == "1"   # the compiled CPU kernels
REQUIRE_CUDA = os.environ.get("FASTVLM_REQUIRE_CUDA") == "1"             # the CUDA build (and sm_90 tools)


def seed_from(*params) -> int:
    """A seed for a test's random inputs, from the test's parameters by a fixed rule: the CRC-32 of their repr
    (ints, strings, tuples and torch dtypes repr the same in every process). Never hash(): Python salts the
    hash of a str per process (PYTHONHASHSEED), so a failure would not rerun with the same inputs."""
    return zlib.crc32(repr(params).encode())


def required_by(backend: str) -> Optional[str]:
    """The setting that requires ``backend`` to run here ('FASTVLM_REQUIRE_EXTENSION=1', ...), or None when a
    test of it may skip. ``cpu`` is the extension's CPU kernels; ``cuda`` its CUDA kernels, required where a GPU
    is present; ``sm90-compile`` the CUDA toolkit that compiles Triton kernels ahead of time (no GPU needed)."""
    if backend == "cpu" and REQUIRE_EXTENSION:
        return "FASTVLM_REQUIRE_EXTENSION=1"
    if backend == "cuda" and torch.cuda.is_available():
        if REQUIRE_EXTENSION:
            return "FASTVLM_REQUIRE_EXTENSION=1"
        if REQUIRE_CUDA:
            return "FASTVLM_REQUIRE_CUDA=1"
    if backend == "sm90-compile" and REQUIRE_CUDA:
        return "FASTVLM_REQUIRE_CUDA=1"
    return None


def skip_unless_runnable(backend: str, reasons: Sequence[str]) -> None:
    """The one rule for a test whose ``backend`` cannot run here (``reasons``, non-empty, say why): it skips,
    or fails where ``required_by(backend)`` says the environment requires that backend (so that CI cannot
    skip what it is meant to check). Nothing happens when ``reasons`` is empty."""
    if not reasons:
        return
    setting = required_by(backend)
    if setting:
        pytest.fail(f"{backend} backend required ({setting}) but: {'; '.join(reasons)}")
    pytest.skip(f"{backend}: {'; '.join(reasons)}")


def backend_skipper(backends: Sequence, probe: Callable[[str, torch.dtype], tuple]) -> Callable:
    """``backend_or_skip(name, device, dtype=torch.float32)`` for one op: returns the op's backend ``name`` (of
    ``backends``, each with ``not_supported_reasons``), after ``skip_unless_runnable`` with its reasons for the
    inputs ``probe(device, dtype)`` builds (what that op's ``not_supported_reasons`` takes)."""
    by_name = {backend.name: backend for backend in backends}

    def backend_or_skip(name: str, device: str, dtype: torch.dtype = torch.float32):
        backend = by_name[name]
        skip_unless_runnable(name, backend.not_supported_reasons(*probe(device, dtype)))
        return backend

    return backend_or_skip


def extension_or_skip(device: str = "cpu") -> None:
    """For tests of the compiled ops themselves (schemas, C++ entries): skips without the extension (or its CUDA
    kernels, on ``cuda``), fails where it is required (``skip_unless_runnable`` of the cpu / cuda backend)."""
    from fastvlm_kernels.ops._dispatch import extension_reasons
    skip_unless_runnable(device, extension_reasons(torch.device(device)))


def random_tree_mask(batch: int, num_nodes: int, generator: torch.Generator, kind: str = "tree") -> torch.Tensor:
    """[B, T] int64 ancestor bitmasks: node j sees itself and its ancestors (parents come first)."""
    rows = []
    for _ in range(batch):
        masks = []
        for node in range(num_nodes):
            if kind == "self" or node == 0:
                masks.append(1 << node)
                continue
            parent = int(torch.randint(0, node, (1,), generator=generator))
            masks.append(masks[parent] | (1 << node))
        rows.append([mask - (1 << 64) if mask >= 1 << 63 else mask for mask in masks])
    return torch.tensor(rows, dtype=torch.int64)


def make_inputs(batch: int, num_q_heads: int, num_kv_heads: int, num_new: int, head_dim: int,
                prefix_lens: Sequence[int], tree: str, dtype: torch.dtype, device: str = "cpu",
                seed: int = 0, transposed_q: bool = False, spare: int = 3):
    """Random q / cache / lengths / mask; the cache has `spare` positions past the longest row."""
    generator = torch.Generator().manual_seed(seed)
    cache_len = max(prefix_lens) + num_new + spare
    q = torch.randn(batch, num_new, num_q_heads, head_dim, generator=generator)
    q = q.transpose(1, 2) if transposed_q else q.transpose(1, 2).contiguous()          # [B, Hq, T, D]
    k_cache = torch.randn(batch, num_kv_heads, cache_len, head_dim, generator=generator)
    v_cache = torch.randn(batch, num_kv_heads, cache_len, head_dim, generator=generator)
    tree_mask: Optional[torch.Tensor] = None
    if tree != "chain":
        tree_mask = random_tree_mask(batch, num_new, generator, tree).to(device)
    prefix = torch.tensor(prefix_lens, dtype=torch.int32, device=device)
    return (q.to(device=device, dtype=dtype), k_cache.to(device=device, dtype=dtype),
            v_cache.to(device=device, dtype=dtype), prefix, tree_mask)


def poisoned_like(tensor: torch.Tensor) -> torch.Tensor:
    """A NaN-filled output buffer, so that any element a kernel forgets to write fails the test."""
    return torch.full_like(tensor, float("nan"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' ops are a few microseconds each: on a shared 2-core machine, two OpenMP threads make
    each one wait on the other (milliseconds per op). One thread keeps these tests fast and deterministic.
    Autouse where a conftest imports it (tests/decoding, tests/imitation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_program(name: str):
    """Imports ``python/<name>.py`` (a recipe program, not part of the package) as a module."""
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "python" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_program_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # dataclasses look their module up while the program runs
    spec.loader.exec_module(module)
    return module

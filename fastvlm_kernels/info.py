"""`python -m fastvlm_kernels.info`: which backends are built and usable here, and why not."""
from __future__ import annotations

import platform

import torch

from .ops import _dispatch, _library
from .ops.verify_attention import BACKENDS as VERIFY_ATTENTION_BACKENDS
from .ops.kv_cache import APPEND_BACKENDS as KV_APPEND_BACKENDS
from .ops.kv_cache import BACKENDS as KV_COMPACT_BACKENDS
from .ops.acceptance import BACKENDS as ACCEPTANCE_BACKENDS
from .ops.lm_head import BACKENDS as LM_HEAD_BACKENDS
from .ops.linear import BACKENDS as LINEAR_BACKENDS

OPS = {"verify_attention": VERIFY_ATTENTION_BACKENDS,
       "kv_compact": KV_COMPACT_BACKENDS,
       "kv_append": KV_APPEND_BACKENDS,
       "accept_greedy / accept_sampling (chains and trees)": ACCEPTANCE_BACKENDS,
       "lm_head (early_exit_head, verify_head)": LM_HEAD_BACKENDS,
       "skinny_linear (fp32 probe)": LINEAR_BACKENDS}


def _probe_inputs(device: torch.device):
    """A small valid input per op, on `device`, to ask each backend whether it would run."""
    q = torch.empty(1, 1, 1, 64, device=device, dtype=torch.float16)
    buffer = torch.empty(1, 2, 1, 1, 1, 64, device=device, dtype=torch.float16)
    return {"verify_attention": (q,),
            "kv_compact": (buffer,),
            "kv_append": (buffer[0, 0],),
            "accept_greedy / accept_sampling (chains and trees)": (
                torch.empty(1, 1, device=device, dtype=torch.int64),
                torch.empty(1, 1, 1, device=device, dtype=torch.float16)),
            "lm_head (early_exit_head, verify_head)": (_lm_head_probe(device),),
            "skinny_linear (fp32 probe)": (torch.empty(1, 64, device=device, dtype=torch.float32),)}


def _lm_head_probe(device: torch.device):
    from .ops.lm_head import _prepare
    hidden = torch.empty(1, 64, device=device, dtype=torch.float16)
    head = _prepare(hidden, torch.empty(64, device=device, dtype=torch.float16),
                    torch.empty(128, 64, device=device, dtype=torch.float16), eps=1e-6, mode="argmax",
                    temperature=1.0, top_k=None, top_p=None, vocab_subset=None, generator=None, seed=None,
                    norm_offset=0.0, logit_scale=1.0, logit_softcap=None, draft_tokens=None, prob_rows=None,
                    validate=False)
    return head


def report() -> str:
    lines = [f"fastvlm_kernels on Python {platform.python_version()}, torch {torch.__version__} "
             f"(CUDA {torch.version.cuda or 'none: CPU build'})"]
    triton_error = _dispatch.triton_import_error()
    if triton_error:
        lines.append(f"triton: {triton_error}")
    else:
        import triton
        lines.append(f"triton {triton.__version__}"
                     + (" (TRITON_INTERPRET=1: kernels run on the CPU)" if _dispatch.triton_interpreting() else ""))
    extension = _library.EXTENSION
    if extension.loaded:
        info = extension.build_info
        lines.append(f"extension: {extension.path}")
        lines.append(f"  built for torch {info.get('torch_version', '?')} (CUDA {info.get('torch_cuda') or 'none'}); "
                     f"CUDA kernels: {'yes, archs ' + info.get('cuda_archs', '') if info.get('with_cuda') else 'no'}")
        if info.get("torch_version") not in (None, torch.__version__):
            lines.append(f"  warning: built for torch {info['torch_version']}, you have {torch.__version__}: rebuild it")
    else:
        lines.append(f"extension: not usable: {extension.error}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        lines.append(f"GPU: {torch.cuda.get_device_name()}")
    else:
        lines.append("GPU: none visible to torch")
    for op, backends in OPS.items():
        lines.append(f"\n{op}")
        for device in devices:
            inputs = _probe_inputs(device)[op]
            for backend in backends:
                reasons = backend.not_supported_reasons(*inputs)
                state = "usable" if not reasons else "not usable: " + "; ".join(reasons)
                lines.append(f"  {device.type:4s} tensors  {backend.name:6s}  {state}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()

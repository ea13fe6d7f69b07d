"""What every benchmark script prints and writes the same way: a row per line, a markdown table, and the
environment the numbers were taken in (device, versions, date)."""
import datetime
import platform

import torch

HIDDEN_IN_LOG = ("copy_gbps",)  # the same in every row: printed once by the scripts that measure it


def format_row(row: dict) -> str:
    return "  ".join(f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in row.items() if key not in HIDDEN_IN_LOG)


def markdown(rows, header: str) -> str:
    if not rows:
        return header + "\n\n(no rows)\n"
    keys = list(dict.fromkeys(key for row in rows for key in row))
    lines = [header, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    info = dict(date=datetime.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__,
                machine=platform.machine(), threads=torch.get_num_threads())
    info["device"] = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info

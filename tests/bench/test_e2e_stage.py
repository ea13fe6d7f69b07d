"""The GPU stage's end-to-end rows, run on the CPU at small sizes (what `DRY_RUN=1 STAGES=e2e-gpu bash
bench/gpu_check.sh` does for every model): bench/e2e.py on an acceptance-controlled model writes the rows the
issue asks for (batch, config, speedup_vs_generate, mean_accepted, identical, ideal_speedup) and names the
model; bench/merge_e2e.py merges runs into one set with a table and a plot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _e2e(tmp_path, model: str, agreement: str, *extra: str) -> Path:
    out = tmp_path / f"{model}-{agreement}.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "e2e.py"), "--model", model, "--synthetic-size", "small",
                    "--agreement", agreement, "--exit-layer", "2", "--batches", "1", "--prompts", "1",
                    "--prompt-len", "16", "--draft-lens", "0", "3", "--max-new-tokens", "12", "--repeats", "1",
                    "--no-assisted", "--cost-model", "--threads", "1", "--json", str(out), *extra],
                   check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return out


@pytest.mark.parametrize("agreement", ["1.0", "0.7"])
def test_synthetic_rows_carry_what_the_gpu_stage_reports(tmp_path, agreement):
    # the high-agreement run also has the stage's second baseline and the eager row beside the compiled one
    extra = ("--static-baseline", "--eager-lens", "3") if agreement == "1.0" else ()
    run = json.loads(_e2e(tmp_path, "synthetic-qwen2", agreement, *extra).read_text())
    assert run["environment"]["model"].startswith("7B-shaped Qwen2-VL")
    assert f"agreeing on {1.0 if agreement == '1.0' else ''}" in run["environment"]["model"]
    rows = {row["config"]: row for row in run["rows"]}
    if extra:
        assert set(rows) == {"generate", "generate_static", "decoder_k0", "decoder_k3", "decoder_k3@eager"}
        assert rows["generate_static"]["identical"] is True
        eager = rows["decoder_k3@eager"]
        assert eager["identical"] is True and eager["compiled"] is False
        assert eager["mean_accepted"] == rows["decoder_k3"]["mean_accepted"]
        assert rows["decoder_k3"]["compiled"] is False     # the CPU: cuda_graphs="auto" runs eagerly here
    else:
        assert set(rows) == {"generate", "decoder_k0", "decoder_k3"}
    k3 = rows["decoder_k3"]
    assert k3["identical"] is True and k3["batch"] == 1 and k3["ideal_speedup"] > 0 and k3["speedup_vs_generate"] > 0
    if agreement == "1.0":
        assert k3["mean_accepted"] == pytest.approx(3.0, abs=0.5)      # every draft kept (the last step cut short)
    else:
        assert 0.3 < k3["mean_accepted"] < 2.9


def test_runs_merge_into_one_set(tmp_path):
    runs = [_e2e(tmp_path, "synthetic-llava", "1.0"), tmp_path / "missing.json"]
    out = tmp_path / "merged"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "merge_e2e.py"), *map(str, runs), "--json",
                             f"{out}.json", "--md", f"{out}.md", "--plot", f"{out}.png"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "missing.json" in result.stderr
    merged = json.loads(Path(f"{out}.json").read_text())
    assert {row["model"] for row in merged["rows"]} == {merged["environment"]["model"]}
    assert len(merged["rows"]) == 3 and Path(f"{out}.png").stat().st_size > 1000
    assert "ideal_speedup" in Path(f"{out}.md").read_text()


@pytest.mark.distributed
def test_tensor_parallel_rows_as_the_tp_stage_runs_them(tmp_path):
    """The tp stage's command (at 2 GPUs there; 2 gloo processes here): model.generate and the decoder at the same
    rank count, rows identical to generate, the collectives per step reported, rank 0 alone writing."""
    out = tmp_path / "tp2.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "bench" / "e2e.py"), "--tp", "2", "--device", "cpu", "--model", "tiny", "--batches", "1",
                    "--prompts", "1", "--max-new-tokens", "8", "--draft-lens", "0", "3", "--repeats", "1",
                    "--threads", "1", "--json", str(out)],
                   check=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    run = json.loads(out.read_text())
    assert run["environment"]["tensor_parallel"] == 2
    rows = {row["config"]: row for row in run["rows"]}
    assert {"generate", "decoder_k0", "decoder_k3"} <= set(rows)
    for name, row in rows.items():
        if name != "generate":
            assert row["identical"] is True and row["collectives_per_step"] > 0, name
    assert rows["decoder_k3"]["collectives_per_step"] > rows["decoder_k0"]["collectives_per_step"]

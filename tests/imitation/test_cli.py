"""`fastvlm train-imitation` and `fastvlm pick-exit-layer` on a local checkpoint written here."""
from __future__ import annotations

import json

import pytest

from fastvlm_kernels.cli import main
from tests.decoding.models import build, sharpen

from .helpers import tokenizer, write_prompts


@pytest.fixture
def checkpoint(tmp_path):
    case = build("llama", seed=2)
    sharpen(case.model, 2, scale=0.5)
    case.model.save_pretrained(tmp_path / "model")
    tokenizer().save_pretrained(tmp_path / "model")
    write_prompts(tmp_path / "data", 10, seed=0)
    return tmp_path


def test_train_imitation_command(checkpoint, capsys):
    command = ["train-imitation", "--model", str(checkpoint / "model"), "--data", str(checkpoint / "data"),
               "--exit-layer", "2", "--out", str(checkpoint / "out"), "--steps", "4", "--batch-size", "4",
               "--lr", "1e-3", "--warmup-steps", "1", "--eval-fraction", "0.2", "--eval-max-new-tokens", "6",
               "--max-new-tokens", "6", "--no-progress"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "drafted tokens accepted per step with the network" in printed and "plain early exit" in printed
    saved = json.loads((checkpoint / "out" / "imitation" / "config.json").read_text())
    assert saved["imitation"]["exit_layer"] == 2 and saved["imitation"]["target_layer"] == 4
    with pytest.raises(SystemExit, match="already holds this run; pass --resume"):
        main(command)
    with pytest.raises(SystemExit, match="already holds a different run"):
        main([*command[:6], "1", *command[7:], "--resume"])
    assert main([*command, "--resume"]) == 0
    with pytest.raises(SystemExit, match="^fastvlm: --exit-layer 2 must be below --target-layer 2: "):
        main([*command, "--target-layer", "2", "--overwrite"])
    with pytest.raises(SystemExit):   # argparse: --resume and --overwrite exclude each other
        main([*command, "--resume", "--overwrite"])
    # a second run continues from the first one's weights, over a draft vocabulary, sharing its answers
    tuned = [*command[:7], "--out", str(checkpoint / "tuned"), *command[9:], "--init-from",
             str(checkpoint / "out" / "imitation"), "--draft-vocab", "8", "--agreement-weight", "0.5",
             "--responses-cache",
             str(checkpoint / "out" / "responses.jsonl"), "--teacher-cache", str(checkpoint / "teacher")]
    assert main(tuned) == 0
    assert len(json.loads((checkpoint / "teacher" / "index.json").read_text())["examples"]) > 0
    saved = json.loads((checkpoint / "tuned" / "run.json").read_text())["config"]
    assert saved["init_from"] == str(checkpoint / "out" / "imitation") and saved["draft_vocab"] == 8
    assert saved["agreement_weight"] == 0.5
    assert not (checkpoint / "tuned" / "responses.jsonl").exists()
    # a third keeps the second's draft vocabulary
    kept = [*tuned[:tuned.index("--out") + 1], str(checkpoint / "kept"), *tuned[tuned.index("--out") + 2:]]
    kept[kept.index("--init-from") + 1] = str(checkpoint / "tuned" / "imitation")
    kept[kept.index("--draft-vocab"):kept.index("--draft-vocab") + 2] = ["--inherit-draft-vocab"]
    assert main(kept) == 0
    saved = json.loads((checkpoint / "kept" / "imitation" / "config.json").read_text())
    assert json.loads((checkpoint / "kept" / "run.json").read_text())["config"]["inherit_draft_vocab"] is True
    assert saved["imitation"]["draft_vocab_size"] == json.loads(
        (checkpoint / "tuned" / "imitation" / "config.json").read_text())["imitation"]["draft_vocab_size"]
    (checkpoint / "data" / "prompts.jsonl").open("a").write('{"prompt": "w5"\n')
    with pytest.raises(SystemExit, match=r"prompts.jsonl:11: not valid JSON"):
        main([*command, "--overwrite"])


def test_pick_exit_layer_command(checkpoint, capsys):
    assert main(["pick-exit-layer", "--model", str(checkpoint / "model"), "--data", str(checkpoint / "data"),
                 "--out", str(checkpoint / "pick"), "--candidates", "1,2", "--steps", "3", "--batch-size", "4",
                 "--eval-fraction", "0.2", "--eval-max-new-tokens", "6", "--max-new-tokens", "6", "--no-progress"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and "Fastest: exit layer" in table
    report = json.loads((checkpoint / "pick" / "exit_layers.json").read_text())
    assert [r["exit_layer"] for r in report["reports"]] == [1, 2]
    for r in report["reports"]:   # lossless; each speedup is its measured times' ratio, the table shows the same
        assert r["identical"], r
        assert r["speedup_early_exit"] == pytest.approx(r["seconds_generate"] / r["seconds_early_exit"])
        assert r["speedup_imitation"] == pytest.approx(r["seconds_generate"] / r["seconds_imitation"])
        assert (f"| {r['exit_layer']} | {r['accepted_early_exit']:.2f} | {r['accepted_imitation']:.2f} | "
                f"{r['speedup_early_exit']:.2f}x | {r['speedup_imitation']:.2f}x | yes |") in rows
    speedup, layer = max((r[f"speedup_{drafter}"], r["exit_layer"]) for r in report["reports"]
                         for drafter in ("early_exit", "imitation"))   # the fastest of every configuration
    assert f"Fastest: exit layer {layer} ({speedup:.2f}x with" in table
    assert (checkpoint / "pick" / "exit_layer_1" / "imitation" / "config.json").is_file()
    # one cache of the model's answers for every candidate
    assert len((checkpoint / "pick" / "responses.jsonl").read_text().splitlines()) == 1 + 8


@pytest.mark.parametrize("command, change, flag, words", [
    ("train-imitation", {"--data": "{root}/missing"}, "--data", "is not a folder"),
    ("train-imitation", {"--data": "{root}/model"}, "model", "holds no .jsonl file"),
    ("train-imitation", {"--model": "{root}/missing"}, "--model", "no such folder"),
    ("train-imitation", {"--exit-layer": "9"}, "--exit-layer", "--exit-layer 9 is out of range: this model has 4"),
    ("train-imitation", {"--exit-layer": "0"}, "--exit-layer", "--exit-layer 0 is out of range"),
    ("train-imitation", {"--steps": "0"}, "steps", "steps must be >= 1, got 0"),
    ("train-imitation", {"--lr": "0"}, "lr", "lr must be > 0, got 0.0"),
    ("train-imitation", {"--init-from": "{root}/missing"}, "--init-from", "no such folder"),
    ("train-imitation", {"--out": "{root}/data/prompts.jsonl"}, "--out", "exists and is not a folder"),
    ("pick-exit-layer", {"--candidates": "1,9"}, "--candidates", "--candidates 9 is out of range: this model has 4"),
    ("pick-exit-layer", {"--eval-fraction": "0"}, "--eval-fraction", "must be > 0"),
    ("pick-exit-layer", {"--data": "{root}/missing"}, "--data", "is not a folder"),
], ids=lambda value: str(value) if isinstance(value, str) and not value.startswith("-") else None)
def test_training_mistakes_are_one_line_before_loading(checkpoint, monkeypatch, command, change, flag, words):
    import fastvlm_kernels.cli as cli

    def load_local(*args, **kwargs):
        raise AssertionError("the model was loaded for a mistake that needs no model")

    monkeypatch.setattr(cli, "load_local", load_local)
    options = {"--model": str(checkpoint / "model"), "--data": str(checkpoint / "data"),
               "--out": str(checkpoint / "out")}
    if command == "train-imitation":
        options["--exit-layer"] = "2"
    options.update({name: value.format(root=checkpoint) for name, value in change.items()})
    with pytest.raises(SystemExit) as ended:
        main([command, *[word for item in options.items() for word in item], "--no-progress"])
    message = str(ended.value.code)
    assert message.startswith("fastvlm: ") and "\n" not in message and flag in message and words in message, message

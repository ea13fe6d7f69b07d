"""`fastvlm generate` on local checkpoints written here (the embedded tiny VLM brings an image processor)."""
from __future__ import annotations

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
    assert "tokens/s" in captured.err and "accepted per step" in captured.err


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


def test_generate_command_with_an_image(tmp_path, capsys):
    """A LLaVA checkpoint with its processor (the tiny VLM's recipe at reduced size, random weights) and an
    image file: the streamed answer is model.generate's."""
    from fastvlm_kernels.models.tiny import scene

    recipe, config, processor, model = _reduced_tiny_vlm(seed=0)
    folder = tmp_path / "vlm"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image, prompt = scene(5)
    image.save(tmp_path / "scene.png")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected_text = processor.tokenizer.decode(expected[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert main(["generate", "--model", str(folder), "--image", str(tmp_path / "scene.png"), "--prompt", prompt,
                 "--exit-layer", "1", "--max-new-tokens", "8", "--draft-len", "2"]) == 0
    assert capsys.readouterr().out.strip() == expected_text.strip()


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

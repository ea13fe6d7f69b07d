"""Data prompts as user messages in the model's chat template (the default), --raw-prompts, and answers that
come back empty."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fastvlm_kernels.imitation import TrainConfig, train_imitation
from fastvlm_kernels.imitation import trainer as trainer_module
from fastvlm_kernels.imitation.data import DataError, Encoder, Example, generate_responses, load_examples
from fastvlm_kernels.imitation.teacher import model_fingerprint
from tests.decoding.models import IMAGE_TOKEN, build

from .helpers import chat_llava_processor, chat_tokenizer, tokenizer, write_image, write_prompts

SHORT = TrainConfig(exit_layer=1, steps=2, batch_size=4, lr=1e-3, eval_fraction=0.0, max_new_tokens=4,
                    checkpoint_every=0)


def test_a_tokenizer_prompt_is_wrapped_in_the_template_without_a_second_bos():
    encoder = Encoder(chat_tokenizer(), chat_template=True)
    assert encoder.uses_chat_template
    ids = encoder.prompt_inputs(Example("x:1", "w10 w11"))["input_ids"]
    assert ids.tolist() == [[3, 10, 11, 4, 5]]
    raw = Encoder(chat_tokenizer(), chat_template=False)
    assert not raw.uses_chat_template and raw.prompt_inputs(Example("x:1", "w10 w11"))["input_ids"].tolist() == \
        [[10, 11]]
    assert not Encoder(tokenizer(), chat_template=True).uses_chat_template   # no template: as written


def test_an_image_line_gets_its_image_in_the_message(tmp_path):
    """The processor's template places the image placeholder (expanded to the 4 image tokens) in the message."""
    image = write_image(tmp_path / "a.png", seed=0)
    encoder = Encoder(chat_llava_processor(), chat_template=True)
    inputs = encoder.prompt_inputs(Example("x:1", "w10", image=image))
    assert inputs["input_ids"].tolist() == [[3] + [IMAGE_TOKEN] * 4 + [10, 4, 5]]
    assert inputs["pixel_values"].shape[0] == 1
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "w10 <image>", "image": "a.png"}) + "\n")
    with pytest.raises(DataError, match="data.jsonl:1: the prompt holds the image placeholder .* --raw-prompts"):
        load_examples(tmp_path, image_token="<image>", chat_template=True)
    assert load_examples(tmp_path, image_token="<image>")[0].prompt == "w10 <image>"   # as written: needed


def test_the_trainer_feeds_templated_prompts_and_caches_them_apart(tmp_path, monkeypatch):
    """train_imitation (default: not raw_prompts) feeds the model prompt tokens that start with the template's,
    generates its answers to them, and records the template in the answers' cache; a cache of answers to the
    raw prompts is refused rather than reused."""
    case = build("llama", seed=2)
    write_prompts(tmp_path / "data", 8, seed=1)
    fed, asked = [], []
    real_forward, real_generate = trainer_module.teacher_forward, case.model.generate
    monkeypatch.setattr(trainer_module, "teacher_forward",
                        lambda adapter, taps, batch, *rest: fed.append(batch) or real_forward(adapter, taps, batch,
                                                                                              *rest))
    monkeypatch.setattr(case.model, "generate", lambda **kw: asked.append(kw["input_ids"]) or real_generate(**kw))
    result = train_imitation(case.model, chat_tokenizer(), tmp_path / "data", tmp_path / "out", SHORT, progress=False)
    prompts = load_examples(tmp_path / "data")
    assert len(asked) == len(prompts)
    for ids, example in zip(asked, prompts):
        words = [int(word[1:]) for word in example.prompt.split()]
        assert ids[0].tolist() == [3, *words, 4, 5]
    assert len(fed) == 2
    for batch in fed:
        for row, mask in zip(batch.model_inputs["input_ids"], batch.loss_mask):
            assert row[0] == 3
            answer_start = int(mask.nonzero()[0])    # the last prompt token: the generation prompt
            assert row[answer_start] == 5 and row[answer_start - 1] == 4
    header = json.loads((tmp_path / "out" / "responses.jsonl").read_text().splitlines()[0])
    assert "chat_template" in header["fingerprint"] and result.config.raw_prompts is False
    # the same data as written, into a cache of its own, then offered the templated run's cache
    raw = train_imitation(case.model, chat_tokenizer(), tmp_path / "data", tmp_path / "raw",
                          replace(SHORT, raw_prompts=True), progress=False)
    assert raw.config.raw_prompts and len(asked) == 2 * len(prompts)
    for ids, example in zip(asked[len(prompts):], prompts):
        assert ids[0].tolist() == [int(word[1:]) for word in example.prompt.split()]
    with pytest.raises(DataError, match="other settings"):
        train_imitation(case.model, chat_tokenizer(), tmp_path / "data", tmp_path / "mixed",
                        replace(SHORT, raw_prompts=True), progress=False,
                        responses_cache=tmp_path / "out" / "responses.jsonl")


def test_prompts_formatted_by_hand_are_refused_with_the_template(tmp_path):
    case = build("llama", seed=2)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.jsonl").write_text("".join(json.dumps({"prompt": f"w3 w{10 + i} w4 w5"}) + "\n"
                                                       for i in range(4)))
    with pytest.raises(DataError, match=r"4 of 4 prompts already start with the model's chat template.*--raw-prompts"):
        train_imitation(case.model, chat_tokenizer(), tmp_path / "data", tmp_path / "out", SHORT, progress=False)


def test_empty_answers_are_counted_and_reported(tmp_path, capsys):
    """A model whose every answer is padding (its LM head zeroed: token 0, a special token, always wins):
    generate_responses counts the empty answers and the trainer says how many, with the hint."""
    case = build("llama", seed=2)
    with torch.no_grad():
        case.model.get_output_embeddings().weight.zero_()
    write_prompts(tmp_path / "data", 6, seed=3)
    examples = load_examples(tmp_path / "data")
    said = []
    empty = generate_responses(case.model, Encoder(tokenizer()), examples, tmp_path / "cache.jsonl",
                               max_new_tokens=3, fingerprint=model_fingerprint(case.model), progress=False,
                               warn=said.append)
    assert empty == 6 and all(example.response_ids == [0, 0, 0] for example in examples)
    assert len(said) == 1 and said[0].startswith("6 of 6 generated answers are empty")
    assert "no chat template" in said[0]
    capsys.readouterr()
    train_imitation(case.model, chat_tokenizer(), tmp_path / "data", tmp_path / "out",
                    replace(SHORT, raw_prompts=True), progress=False)
    err = capsys.readouterr().err
    assert err.count("generated answers are empty") == 1 and "6 of 6 generated answers are empty" in err
    assert "drop --raw-prompts" in err


def test_a_run_recorded_before_raw_prompts_existed_resumes_as_raw(tmp_path):
    """A run.json without raw_prompts was written by a trainer that sent prompts as written: it resumes with
    raw_prompts=True, and is a different run for templated prompts."""
    case = build("llama", seed=2)
    write_prompts(tmp_path / "data", 6, seed=1, responses=True)
    config = replace(SHORT, steps=1, raw_prompts=True)
    train_imitation(case.model, chat_tokenizer(), tmp_path / "data", tmp_path / "out", config, progress=False)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    del record["config"]["raw_prompts"]
    (tmp_path / "out" / "run.json").write_text(json.dumps(record))
    train_imitation(case.model, chat_tokenizer(), tmp_path / "data", tmp_path / "out", config, progress=False,
                    resume=True)
    (tmp_path / "out" / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="config.raw_prompts: True there, False here"):
        train_imitation(case.model, chat_tokenizer(), tmp_path / "data", tmp_path / "out", SHORT, progress=False,
                        resume=True)

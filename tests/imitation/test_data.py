"""Training data: JSONL parsing and its errors, batches for text and image models, the model's own responses."""
from __future__ import annotations

import json

import pytest
import torch

from fastvlm_kernels.imitation.data import DataError, Encoder, Example, generate_responses, load_examples
from fastvlm_kernels.imitation.teacher import model_fingerprint
from tests.decoding.models import IMAGE_TOKEN, build

from .helpers import llava_processor, random_words, tokenizer, write_image, write_prompts


def test_malformed_lines_are_reported_with_file_and_line(tmp_path):
    lines = ['{"prompt": "w5 w6"}', '{"prompt": "w7", ', '', '{"response": "w9"}', '{"prompt": 5}',
             '{"prompt": "w8", "image": 3}', '["w5"]', '{"prompt": "w9 w10", "response": "w11"}',
             '{"prompt": "w12", "response": 7}']
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    write_prompts(tmp_path, 2, name="b.jsonl")
    with pytest.raises(DataError) as error:
        load_examples(tmp_path)
    message = str(error.value)
    for number, reason in ((2, "not valid JSON"), (4, "'prompt' is missing"), (5, "'prompt' is missing"),
                           (6, "'image' must be"), (7, "expected a JSON object"), (9, "'response' must be")):
        assert f"a.jsonl:{number}: {reason}" in message
    assert "a.jsonl:1:" not in message and "a.jsonl:3:" not in message and "a.jsonl:8:" not in message
    assert "6 malformed line(s)" in message and "--skip-malformed" in message
    warnings = []
    examples = load_examples(tmp_path, skip_malformed=True, warn=warnings.append)
    assert [example.source.rsplit("/", 1)[-1] for example in examples] == ["a.jsonl:1", "a.jsonl:8", "b.jsonl:1",
                                                                            "b.jsonl:2"]
    assert examples[1].response == "w11" and examples[0].response is None
    assert len(warnings) == 1 and "a.jsonl:7: expected a JSON object" in warnings[0]


@pytest.mark.parametrize("line, reason", [('{"prompt": "w7', "Unterminated string starting at column 12"),
                                          ('{"prompt": "w7" "w8"}', "Expecting ',' delimiter at column 17")],
                         ids=["unterminated", "delimiter"])
def test_a_json_error_names_its_column_once(tmp_path, line, reason):
    """json's message may end in "at" ("Unterminated string starting at"): no "at at column"."""
    (tmp_path / "a.jsonl").write_text(line)   # no newline: one inside the string is a control character
    with pytest.raises(DataError) as error:
        load_examples(tmp_path)
    assert f"a.jsonl:1: not valid JSON ({reason})" in str(error.value) and "at at" not in str(error.value)


def test_missing_images_and_image_lines_for_text_models(tmp_path):
    write_image(tmp_path / "pics" / "cat.png", 0)
    (tmp_path / "data.jsonl").write_text(
        json.dumps({"prompt": "w5 <image>", "image": "pics/cat.png"}) + "\n" +
        json.dumps({"prompt": "w6 <image>", "image": "pics/dog.png"}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: image file 'pics/dog.png' not found \(looked for .*dog.png\)"):
        load_examples(tmp_path, image_token="<image>", skip_malformed=True)   # missing images are never skipped
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "w5 <image>", "image": "pics/cat.png"}) + "\n")
    with pytest.raises(DataError, match="data.jsonl:1: the line has an image .* text-only"):
        load_examples(tmp_path, allow_images=False)
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "w5", "image": "pics/cat.png"}) + "\n")
    with pytest.raises(DataError, match="data.jsonl:1: the line has an image but its prompt lacks .*<image>"):
        load_examples(tmp_path, image_token="<image>")
    with pytest.raises(DataError, match="holds no .jsonl"):
        load_examples(tmp_path / "pics")


def test_text_batches_are_right_padded_with_the_loss_on_response_positions():
    encoder = Encoder(tokenizer())
    examples = [Example("x:1", "w5 w6 w7", response="w8 w9"), Example("x:2", "w10", response_ids=[11, 12, 13, 2])]
    batch = encoder.collate(examples)
    ids = batch.model_inputs["input_ids"]
    # row 0: prompt 5 6 7, response 8 9 + EOS (2); row 1: prompt 10, response 11 12 13 2, then a pad (0)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 2], [10, 11, 12, 13, 2, 0]]
    assert batch.model_inputs["attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    # a position is in the loss when its next token is a response token
    assert batch.loss_mask.int().tolist() == [[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    assert Encoder(tokenizer(), max_response_tokens=2).collate(examples[:1]).model_inputs["input_ids"].tolist() == \
        [[5, 6, 7, 8, 9]]


def test_image_batches_mix_image_and_text_rows(tmp_path):
    encoder = Encoder(llava_processor())
    image = write_image(tmp_path / "a.png", 1)
    examples = [Example("x:1", "w5 <image> w6", image=image, response_ids=[20, 21]),
                Example("x:2", "w7 w8", response_ids=[22, 23, 24, 2])]
    batch = encoder.collate(examples)
    ids = batch.model_inputs["input_ids"]
    assert ids[0].tolist() == [5] + [IMAGE_TOKEN] * 4 + [6, 20, 21]
    assert ids[1].tolist() == [7, 8, 22, 23, 24, 2, 0, 0]
    assert batch.model_inputs["pixel_values"].shape == (1, 3, 28, 28)
    assert batch.loss_mask.int().tolist() == [[0] * 5 + [1, 1, 0], [0, 1, 1, 1, 1, 0, 0, 0]]
    case = build("llava", seed=0)
    logits = case.model(**batch.model_inputs).logits   # the model takes the batch as it is
    assert logits.shape == (2, 8, 120) and torch.isfinite(logits).all()


def test_generated_responses_are_the_models_own_cached_and_resumable(tmp_path):
    case = build("llama", seed=5)
    encoder = Encoder(tokenizer())
    write_prompts(tmp_path / "data", 3, seed=1)
    cache = tmp_path / "responses.jsonl"
    fingerprint = model_fingerprint(case.model)

    def fresh():
        return load_examples(tmp_path / "data")

    examples = fresh()
    generate_responses(case.model, encoder, examples, cache, max_new_tokens=6, fingerprint=fingerprint, progress=False)
    for example in examples:
        inputs = encoder.prompt_inputs(example)
        expected = case.model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        expected = expected.tolist()
        if 2 in expected:
            expected = expected[:expected.index(2) + 1]
        assert example.response_ids == expected
    lines = cache.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["fingerprint"]["max_new_tokens"] == 6
    # an interrupted run: the last answer half written
    cache.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    again = fresh()
    generate_responses(case.model, encoder, again, cache, max_new_tokens=6, fingerprint=fingerprint, progress=False)
    assert [e.response_ids for e in again] == [e.response_ids for e in examples]
    assert cache.read_text().splitlines()[:3] == lines[:3] and len(cache.read_text().splitlines()) == 4
    other = model_fingerprint(build("llama", seed=6).model)
    assert other != fingerprint
    with pytest.raises(DataError, match="generated by another model"):
        generate_responses(case.model, encoder, fresh(), cache, max_new_tokens=6, fingerprint=other, progress=False)


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_batched_responses_match_one_prompt_at_a_time(tmp_path, family):
    """Prompts of different lengths answered 3 at a time (left-padded, length-sorted) give each prompt the
    answer it gets alone (fp32 random models: no near ties), images included; the cache records the batch size."""
    case = build(family, seed=7)
    data = tmp_path / "data"
    if family == "llava":
        encoder = Encoder(llava_processor())
        data.mkdir()
        generator = torch.Generator().manual_seed(3)
        with open(data / "prompts.jsonl", "w") as handle:
            for index in range(7):
                write_image(data / f"{index}.png", seed=index)
                handle.write(json.dumps({"prompt": f"w4 <image> {random_words(generator, 1, 9)}",
                                         "image": f"{index}.png"}) + "\n")
    else:
        encoder = Encoder(tokenizer())
        write_prompts(data, 7, seed=4)
    fingerprint = model_fingerprint(case.model)
    alone, together = load_examples(data), load_examples(data)
    generate_responses(case.model, encoder, alone, tmp_path / "alone.jsonl", max_new_tokens=5,
                       fingerprint=fingerprint, progress=False)
    generate_responses(case.model, encoder, together, tmp_path / "together.jsonl", max_new_tokens=5,
                       fingerprint=fingerprint, progress=False, batch_size=3)
    assert [e.response_ids for e in together] == [e.response_ids for e in alone]
    assert all(e.response_ids for e in together)
    header = json.loads((tmp_path / "together.jsonl").read_text().splitlines()[0])
    assert header["fingerprint"]["batch_size"] == 3
    with pytest.raises(DataError, match="other settings"):      # a batch-1 cache is not reused for batch 3
        generate_responses(case.model, encoder, load_examples(data), tmp_path / "alone.jsonl", max_new_tokens=5,
                           fingerprint=fingerprint, progress=False, batch_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        generate_responses(case.model, encoder, load_examples(data), tmp_path / "x.jsonl", max_new_tokens=5,
                           fingerprint=fingerprint, progress=False, batch_size=0)


def test_vocab_subset_from_responses_takes_the_most_frequent_answer_tokens(tmp_path):
    from fastvlm_kernels.imitation.data import CACHE_FORMAT, response_token_ids, vocab_subset_from_responses
    header = json.dumps({"format": CACHE_FORMAT, "fingerprint": {"max_new_tokens": 8}})
    answers = [[5, 9, 9, 2], [9, 7, 7, 5, 2], [11, 9]]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(header + "\n" + "".join(json.dumps({"key": str(i), "response_ids": ids}) + "\n"
                                             for i, ids in enumerate(answers[:2])))
    second.write_text(header + "\n" + json.dumps({"key": "x", "response_ids": answers[2]}) + "\n"
                      + '{"key": "cut', )                       # an interrupted last line is skipped
    size = second.stat().st_size
    ids = response_token_ids([first, second])
    assert sorted(ids.tolist()) == sorted(sum(answers, []))
    assert second.stat().st_size == size                        # read only
    # counts: 9 x4, 2 x2, 5 x2, 7 x2, 11 x1 -> top 3 with ties to the lower id: 9, 2, 5; plus EOS-like 40
    subset = vocab_subset_from_responses([first, second], vocab_size=50, size=3, always_include=[40])
    assert subset.tolist() == [2, 5, 9, 40] and subset.dtype == torch.int64
    assert vocab_subset_from_responses(first, 50, 1).tolist() == [9]
    with pytest.raises(DataError, match="not found"):
        response_token_ids([tmp_path / "missing.jsonl"])
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "w5"}\n')
    with pytest.raises(DataError, match="not a responses cache"):
        response_token_ids([tmp_path / "prompts.jsonl"])

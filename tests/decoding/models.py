"""Tiny random-weight models of every family the decoder supports, built offline from configs, with
inputs shaped like their processors' outputs (left-padded, image tokens in place)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_LAYERS = 4
VOCAB = 120
TEXT = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=NUM_LAYERS,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
IMAGE_TOKEN = 119

FAMILIES = ("llama", "mistral", "qwen2", "llava", "llava-qwen2", "llava_next", "qwen2_vl", "qwen2_5_vl")


@dataclass
class Case:
    model: torch.nn.Module
    inputs: dict           # input_ids, attention_mask, pixel_values, ... as a processor returns them


TIE_GAP = 1e-4


def _extended_inputs(inputs: dict, sequences: torch.Tensor) -> dict:
    """The processor outputs with input_ids replaced by prompt + generated tokens (teacher forcing)."""
    extended = dict(inputs)
    prompt_len = inputs["input_ids"].shape[1]
    extra = sequences.shape[1] - prompt_len
    extended["input_ids"] = sequences
    device = sequences.device
    extended["attention_mask"] = torch.cat([inputs["attention_mask"],
                                            torch.ones(sequences.shape[0], extra, dtype=torch.long, device=device)], 1)
    if "mm_token_type_ids" in inputs:
        extended["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                   torch.zeros(sequences.shape[0], extra, dtype=torch.long,
                                                               device=device)], 1)
    return extended


def assert_lossless(case, got: torch.Tensor, expected: torch.Tensor, label: str, ties: list) -> None:
    """Token-identical, or the first difference of each row is a floating-point tie of the full model (top-2
    logit gap under TIE_GAP at that position, the decoder's token one of the two), recorded in ``ties``."""
    if torch.equal(got, expected):
        return
    prompt_len = case.inputs["input_ids"].shape[1]
    width = min(got.shape[1], expected.shape[1])
    logits = None
    differing_rows = 0
    for row in range(expected.shape[0]):
        differs = (got[row, :width] != expected[row, :width]).nonzero()
        if len(differs) == 0:   # a row may end earlier in one run only after a tie changed another row
            continue
        differing_rows += 1
        position = int(differs[0])
        assert position >= prompt_len, f"{label}: row {row} differs inside the prompt"
        if logits is None:
            with torch.no_grad():
                logits = case.model(**_extended_inputs(case.inputs, expected)).logits.float()
        top2 = torch.topk(logits[row, position - 1], 2)
        gap = float(top2.values[0] - top2.values[1])
        assert gap < TIE_GAP, (f"{label}: row {row} differs from model.generate at new token {position - prompt_len} "
                               f"(got {int(got[row, position])}, expected {int(expected[row, position])}) and the "
                               f"model's top-2 logit gap there is {gap:.3g} >= {TIE_GAP}: not a tie")
        assert int(got[row, position]) in top2.indices.tolist(), \
            f"{label}: row {row}, new token {position - prompt_len}: the decoder's token is not one of the tied two"
        ties.append(f"{label}: row {row}, new token {position - prompt_len}, top-2 gap {gap:.2e}")
    assert differing_rows, f"{label}: lengths differ ({got.shape[1]} vs {expected.shape[1]}) with equal tokens"


def sharpen(model, exit_layer: int, scale: float = 0.05) -> None:
    """Shrinks what layers >= exit_layer add to the residual stream, so that an early exit agrees with the
    full model often (but not always): acceptance paths get exercised, not only rejections."""
    layers = find_layers(model)
    with torch.no_grad():
        for layer in layers[exit_layer:]:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)


def find_layers(model):
    inner = model.model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


def _text_ids(generator, batch, length, pad_rows):
    ids = torch.randint(3, 100, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in pad_rows.items():
        if row < batch:
            ids[row, :pad] = 0
            mask[row, :pad] = 0
    return ids, mask


def build(family: str, seed: int = 0, batch: int = 1, dtype=torch.float32, text: dict = None) -> Case:
    """``text``: overrides of the text model's configuration (:data:`TEXT`), e.g. head counts."""
    torch.manual_seed(seed)
    text_config = dict(TEXT, **(text or {}))
    generator = torch.Generator().manual_seed(seed + 100)
    pad_rows = {1: 3, 2: 1, 3: 5}
    if family in ("llama", "mistral", "qwen2"):
        import transformers
        config_class, model_class = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }[family]
        extra = dict(sliding_window=None) if family in ("mistral", "qwen2") else {}
        model = model_class(config_class(**text_config, **extra))
        ids, mask = _text_ids(generator, batch, 11, pad_rows)
        return Case(model.to(dtype).eval(), dict(input_ids=ids, attention_mask=mask))
    if family in ("llava", "llava-qwen2"):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
        text = LlamaConfig(**text_config) if family == "llava" else Qwen2Config(**text_config, sliding_window=None)
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                          image_token_id=IMAGE_TOKEN))
        ids, mask = _text_ids(generator, batch, 14, pad_rows)
        ids[:, 7:11] = IMAGE_TOKEN            # 4 patches of 14x14 in a 28x28 image, CLS dropped
        pixels = torch.randn(batch, 3, 28, 28, generator=generator)
        return Case(model.to(dtype).eval(), dict(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(dtype)))
    if family == "llava_next":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(
            vision_config=vision, text_config=LlamaConfig(**text_config), image_token_id=IMAGE_TOKEN,
            image_grid_pinpoints=[[28, 56], [56, 28]]))
        image_sizes = torch.tensor([[28, 56]] * batch)
        pixels = torch.randn(batch, 3, 3, 28, 28, generator=generator)   # base image + 2 tiles
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixels, image_sizes=image_sizes)
        features = getattr(features, "pooler_output", features)
        num_image_tokens = features[0].shape[0]
        length = num_image_tokens + 10
        ids, mask = _text_ids(generator, batch, length, pad_rows)
        ids[:, 6:6 + num_image_tokens] = IMAGE_TOKEN
        return Case(model.to(dtype).eval(), dict(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(dtype),
                                                  image_sizes=image_sizes))
    if family in ("qwen2_vl", "qwen2_5_vl"):
        import transformers
        text = dict(text_config, vocab_size=160, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": [8, 12, 12]})
        tokens = dict(image_token_id=151, video_token_id=152, vision_start_token_id=150, vision_end_token_id=153)
        if family == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, num_heads=2, hidden_size=text["hidden_size"], patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2, in_chans=3, mlp_ratio=2)
            model = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
                text_config=text, vision_config=vision, **tokens))
        else:
            vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                          out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                          temporal_patch_size=2, in_channels=3, window_size=56, fullatt_block_indexes=[0])
            model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
                text_config=text, vision_config=vision, **tokens))
        ids, mask = _text_ids(generator, batch, 16, pad_rows)
        ids[:, 6], ids[:, 7:11], ids[:, 11] = 150, 151, 153       # a 4x4 patch grid merged 2x2: 4 image tokens
        pixels = torch.randn(batch * 16, 3 * 2 * 14 * 14, generator=generator)
        grid = torch.tensor([[1, 4, 4]] * batch)
        mm_types = (ids == 151).long()
        return Case(model.to(dtype).eval(), dict(input_ids=ids, attention_mask=mask, pixel_values=pixels.to(dtype),
                                                  image_grid_thw=grid, mm_token_type_ids=mm_types))
    raise ValueError(family)


def patch_acceptance(patch, name: str, replacement) -> None:
    """Makes the decoder's ``name`` plans ("accept_greedy", "accept_sampling" or their "_tree" forms) call
    ``replacement(run, *args, **kwargs)`` where they would run the chosen kernel; ``run`` is the real plan's."""
    import fastvlm_kernels.decoding.decoder as chain_module
    import fastvlm_kernels.decoding.tree_step as tree_module
    decoder_module = tree_module if name.endswith("_tree") else chain_module
    make_plan = getattr(decoder_module, name + "_plan")

    class Plan:
        def __init__(self, plan):
            self.plan = plan

        def run(self, *args, **kwargs):
            return replacement(self.plan.run, *args, **kwargs)
    patch.setattr(decoder_module, name + "_plan", lambda *args, **kwargs: Plan(make_plan(*args, **kwargs)))

"""Compiled decoding (trm_lm/compiled.py): the same tokens as generate() on the dynamic cache, one compiled graph
for every length, and clear refusals of what cannot be compiled.

Every test decodes two rows, so that all of them share the one graph compiled for batch size 2 and the
model's supervision steps (compiling takes seconds; the test-time-depth test compiles a second one).
"""

import pytest
import torch
import torch._dynamo

from trm_lm.compiled import CompiledDecoder, compiled_decoder
from trm_lm.generation import GenerationSettings, generate_text, stream_generate

PROMPTS = ["Once upon a time", "Lily and Tom went to the park with a big red ball"]


@pytest.fixture(scope="module")
def decoder(model_and_tokenizer):
    model, _ = model_and_tokenizer
    return compiled_decoder(model)


def left_padded(tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert (batch.attention_mask == 0).any(), "the prompts should differ in length, so that one row is padded"
    return batch.input_ids, batch.attention_mask


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_greedy_tokens_equal_generate_on_the_dynamic_cache_in_one_graph_for_every_length(model_and_tokenizer,
                                                                                         decoder):
    model, tokenizer = model_and_tokenizer
    input_ids, mask = left_padded(tokenizer, PROMPTS)
    pad = tokenizer.pad_token_id
    compiled_before = graphs_compiled()
    for new_tokens in (5, 40):  # two lengths: the static cache keeps the step's shapes, so one graph serves both
        expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=pad, halt_threshold=0)
        got = decoder.generate(input_ids, mask, max_new_tokens=new_tokens, pad_token_id=pad)
        assert torch.equal(got, expected), f"{new_tokens} new tokens"
    assert graphs_compiled() - compiled_before <= 1  # 0 when an earlier test compiled it

    # the logits, not only their argmax: the compiled step against the model's uncached forward
    sequences = decoder.generate(input_ids, mask, max_new_tokens=12, pad_token_id=pad)
    full_mask = torch.cat([mask, torch.ones(2, 12, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    reference = model(sequences, attention_mask=full_mask, position_ids=positions, use_cache=False,
                      halt_threshold=0).logits[:, -1]
    cache = decoder._caches[(2, model.config.supervision_steps, model.device, model.dtype)]
    step = decoder._step(sequences[:, -1:], positions[:, -1:],
                         torch.cat([full_mask, torch.ones(2, decoder.max_length - full_mask.shape[1],
                                                          dtype=mask.dtype)], 1), cache,
                         model.config.supervision_steps)
    torch.testing.assert_close(step, reference, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_streaming_and_eos_padding_match_the_uncompiled_generation(model_and_tokenizer, decoder):
    model, tokenizer = model_and_tokenizer
    sampled = dict(max_new_tokens=30, temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2, seed=11,
                   num_return_sequences=2, halt_threshold=0)
    plain = generate_text(model, tokenizer, PROMPTS[0], GenerationSettings(**sampled))
    compiled = generate_text(model, tokenizer, PROMPTS[0], GenerationSettings(**sampled, compile=True))
    assert compiled.token_ids == plain.token_ids and compiled.texts == plain.texts
    assert plain.token_ids[0] != plain.token_ids[1]  # the rows really sampled apart

    # a row that reaches EOS early is padded after it while the other row goes on, as generate() does
    input_ids, mask = left_padded(tokenizer, PROMPTS)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        first = model(input_ids, attention_mask=mask, halt_threshold=0).logits[:, -1].argmax(-1)  # (2,)
    model.generation_config.eos_token_id = int(first[0])  # row 0 "ends" at its first token
    try:
        expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, halt_threshold=0)
        got = decoder.generate(input_ids, mask, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id)
    finally:
        model.generation_config.eos_token_id = eos
    assert torch.equal(got, expected)
    assert (got[0, input_ids.shape[1] + 1:] == tokenizer.pad_token_id).all()

    settings = GenerationSettings(max_new_tokens=25, temperature=0.8, seed=5, halt_threshold=0, compile=True)
    stream = stream_generate(model, tokenizer, PROMPTS[1], settings)
    pieces = []
    try:
        while True:
            pieces.append(next(stream))
    except StopIteration as finished:
        result = finished.value
    reference = generate_text(model, tokenizer, PROMPTS[1], GenerationSettings(
        max_new_tokens=25, temperature=0.8, seed=5, halt_threshold=0, num_return_sequences=1))
    assert "".join(pieces) == result.text == reference.text


def test_test_time_depth_compiles_its_own_graph_with_the_extra_cache_slots(model_and_tokenizer, decoder):
    model, tokenizer = model_and_tokenizer
    input_ids, mask = left_padded(tokenizer, PROMPTS)
    deeper = 2 * model.config.supervision_steps
    expected = model.generate(input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, halt_threshold=0, supervision_steps=deeper)
    got = decoder.generate(input_ids, mask, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id,
                           supervision_steps=deeper)
    assert torch.equal(got, expected)
    assert len(decoder._caches[(2, deeper, model.device, model.dtype)].layers) == \
        deeper * model.model.core.layers_per_step


def test_what_cannot_be_compiled_is_refused_with_the_reason(model_and_tokenizer, decoder):
    model, tokenizer = model_and_tokenizer
    input_ids, mask = left_padded(tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="early exit"):
        decoder.generate(input_ids, mask, max_new_tokens=4, halt_threshold=0.5)
    with pytest.raises(ValueError, match="share_step_cache"):
        decoder.generate(input_ids, mask, max_new_tokens=4, share_step_cache=True)
    with pytest.raises(ValueError, match="must fit the compiled cache"):
        decoder.generate(input_ids, mask, max_new_tokens=decoder.max_length)
    with pytest.raises(ValueError, match="max_length"):
        CompiledDecoder(model, max_length=model.config.max_position_embeddings + 1)
    for settings in (dict(halt_threshold=0.5), dict(halt_threshold=0, share_step_cache=True)):
        with pytest.raises(ValueError, match="compile runs every supervision step"):
            generate_text(model, tokenizer, "Once", GenerationSettings(max_new_tokens=4, compile=True, **settings))
    with pytest.raises(ValueError, match="traces come from the uncompiled"):
        generate_text(model, tokenizer, "Once", GenerationSettings(max_new_tokens=4, halt_threshold=0, compile=True),
                      trace_top_k=3)
    with pytest.raises(ValueError, match="compile must be True or False"):
        GenerationSettings(compile="yes")
    model.train()
    try:
        with pytest.raises(ValueError, match="model.eval"):
            decoder.generate(input_ids, mask, max_new_tokens=4)
    finally:
        model.eval()
    assert compiled_decoder(model) is decoder  # one per model: its graphs are reused

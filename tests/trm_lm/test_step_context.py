"""step_context="first_step": later supervision steps attend to the earlier tokens' first-step keys/values, so the
KV cache keeps one step's slots (N_sup times less memory) and cached decoding is still exact: it computes what
the uncached forward, and training, compute. Early exit needs no copy-forward and deeper runs no extra slots.
"""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from tests.helpers import build_tiny_model
from tests.trm_lm.test_modeling_trm import (assert_act_decoding_matches_the_full_sequence,
                                            assert_twice_the_trained_depth_is_cached_exactly, cache_numel,
                                            make_halting_mixed, tiny_model)
from tests.trm_lm.test_serving import drain
from trm_lm import TRMConfig
from trm_lm.compiled import CompiledDecoder
from trm_lm.export import main as export_main
from trm_lm.generation import GenerationSettings, generate_text, load_model_and_tokenizer
from trm_lm.modeling_trm import CACHE_FIELD
from trm_lm.serving import BatchedDecoder

FIRST_STEP_CONFIGS = [
    dict(supervision_steps=3, cycles=2, latent_steps=2),
    dict(supervision_steps=4, cycles=1, latent_steps=1, norm_position="pre"),
    dict(supervision_steps=2, cycles=2, latent_steps=1, input_injection="concat", position_encoding="learned"),
]


def first_step_model(seed=0, **overrides):
    return tiny_model(seed=seed, step_context="first_step", **overrides)


def left_padded_prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(1, 61, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


@pytest.mark.parametrize("overrides", FIRST_STEP_CONFIGS)
def test_cached_decoding_equals_the_uncached_forward_in_a_padded_batch(overrides):
    """Prefill a left-padded batch, then one token at a time: every position's logits equal the full forward's."""
    model = first_step_model(**overrides)
    ids, mask = left_padded_prompts([30, 22, 27])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        pieces = [model(ids[:, :12], attention_mask=mask[:, :12], position_ids=positions[:, :12], cache=cache,
                        use_cache=True).logits]
        for t in range(12, ids.shape[1]):
            pieces.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                                cache=cache, use_cache=True).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[real], full[real], rtol=1e-5, atol=1e-5)
    kwargs = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, use_cache=True, **kwargs),
                       model.generate(ids, attention_mask=mask, use_cache=False, **kwargs))


def test_the_cache_keeps_one_step_and_the_model_differs_from_every_step_context():
    model = first_step_model(supervision_steps=3)
    every = tiny_model(supervision_steps=3)  # same seed: the same weights
    assert model.config.num_hidden_layers * 3 == every.config.num_hidden_layers == 3 * model.model.core.layers_per_step
    ids = torch.randint(1, 61, (2, 9))
    with torch.no_grad():
        out, reference = model(ids, use_cache=True), every(ids, use_cache=True)
        one_step = model(ids, supervision_steps=1).logits
    cache = getattr(out, CACHE_FIELD)
    assert len(cache.layers) == model.config.num_hidden_layers
    assert cache_numel(cache) * 3 == cache_numel(getattr(reference, CACHE_FIELD))
    # one step is the same computation in both; after it, what the steps attend to differs
    torch.testing.assert_close(one_step, every(ids, supervision_steps=1).logits)
    assert not torch.allclose(out.logits, reference.logits, atol=1e-3)


def test_later_steps_attend_to_the_context_then_each_token_to_itself():
    """The recorded attention of a later step: over (first-step keys of tokens <= t, then the chunk's own keys),
    causal on the first part and diagonal on the second; the first step's is the plain causal one."""
    model = first_step_model(supervision_steps=2, cycles=1, latent_steps=1, net_layers=1)
    ids = torch.randint(1, 61, (1, 6))
    with torch.no_grad():
        attentions = model(ids, output_attentions=True, use_cache=False).attentions
    first, later = attentions[0], attentions[-1]
    assert first.shape == (1, 2, 6, 6) and later.shape == (1, 2, 6, 12)
    torch.testing.assert_close(later.sum(-1), torch.ones(1, 2, 6))
    causal, diagonal = torch.ones(6, 6, dtype=torch.bool).tril(), torch.eye(6, dtype=torch.bool)
    context, own = later[..., :6], later[..., 6:]
    assert (context[..., ~causal] == 0).all() and (context[..., causal] > 0).all()
    assert (own[..., ~diagonal] == 0).all() and (own[..., diagonal] > 0).all()
    assert (first[..., ~causal] == 0).all() and (first[..., causal] > 0).all()


@pytest.mark.parametrize("overrides", [dict(supervision_steps=3), dict(supervision_steps=4, cycles=1, latent_steps=1)])
def test_act_decoding_equals_the_full_sequence_and_needs_no_copies(overrides):
    model = first_step_model(**overrides)
    cache = assert_act_decoding_matches_the_full_sequence(model)
    # one step's slots, each holding every token once: halted tokens wrote nothing after their first step
    assert len(cache.layers) == model.config.num_hidden_layers == model.model.core.layers_per_step
    assert all(layer.keys.shape[2] == 40 for layer in cache.layers)


def test_act_in_a_batch_and_a_static_cache_give_each_row_its_own_tokens():
    model = first_step_model(supervision_steps=4, cycles=1, latent_steps=1)
    make_halting_mixed(model)
    ids, mask = left_padded_prompts([6, 3, 5], seed=2)
    for halt_threshold in (0, 0.5):
        kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, halt_threshold=halt_threshold,
                      pad_token_id=0)
        batch = model.generate(ids, attention_mask=mask, **kwargs)
        assert torch.equal(model.generate(ids, attention_mask=mask, cache_implementation="static", **kwargs), batch)
        assert torch.equal(model.generate(ids, attention_mask=mask, use_cache=False, **kwargs), batch)
        for row, length in enumerate([6, 3, 5]):
            alone = model.generate(ids[row:row + 1, 6 - length:], **kwargs)
            assert torch.equal(alone[0, length:], batch[row, 6:])
    with torch.no_grad():  # a prefill into an empty StaticCache gets no mask: the later steps must stay causal
        static = StaticCache(config=model.config, max_cache_len=20)
        torch.testing.assert_close(model(ids[:1], cache=static, use_cache=True).logits, model(ids[:1]).logits)


def test_test_time_depth_needs_no_extra_slots_and_stays_exact():
    model = first_step_model(supervision_steps=2)
    deeper, _ = assert_twice_the_trained_depth_is_cached_exactly(model)
    assert len(getattr(deeper, CACHE_FIELD).layers) == model.config.num_hidden_layers


def test_training_sends_the_later_steps_gradient_into_the_context_keys():
    """The context is not detached like the carry: the final step's prediction at the last position reaches
    every earlier token, and the only path there is their first-step keys/values (its own carry is detached)."""
    model = first_step_model(supervision_steps=2, cycles=1, latent_steps=1).train()
    ids = torch.randint(1, 61, (1, 8))
    embeddings = (model.model.embed_tokens(ids) * 1.0).detach().requires_grad_(True)
    out = model(inputs_embeds=embeddings, use_cache=False, supervision_steps=2)
    out.logits[0, -1].sum().backward()  # the final (second) step's prediction at the last position
    assert (embeddings.grad[0, :-1].abs().sum(-1) > 0).all()


def test_bad_combinations_are_clear_errors():
    with pytest.raises(ValueError, match="step_context must be one of"):
        TRMConfig(step_context="last_step")
    with pytest.raises(ValueError, match="causal attention"):
        TRMConfig(step_context="first_step", causal=False)
    model = first_step_model(supervision_steps=2)
    with pytest.raises(ValueError, match="already holds one step"):
        model(torch.ones(1, 3, dtype=torch.long), cache=DynamicCache(config=model.config), share_step_cache=True)


# ----- the same model through the checked loader, the batched server, compiled decoding and the ONNX step ---

@pytest.fixture(scope="module")
def first_step_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-first-step"), step_context="first_step")


def test_saved_folder_keeps_the_context_and_serves_batches_exactly(first_step_dir):
    model, tokenizer = load_model_and_tokenizer(first_step_dir, device="cpu")
    assert model.config.step_context == "first_step"
    assert model.config.num_hidden_layers == model.model.core.layers_per_step
    prompts = ["Once upon a time", "Lily and Tom went to the park with a big red ball and the dog.", "The cat"]
    for halt_threshold in (0, 0.5):
        settings = [GenerationSettings(max_new_tokens=20 + 4 * i, temperature=0.9, top_p=0.9, seed=50 + i,
                                       halt_threshold=halt_threshold) for i in range(len(prompts))]
        alone = [generate_text(model, tokenizer, p, s) for p, s in zip(prompts, settings)]
        decoder = BatchedDecoder(model, tokenizer, gather_seconds=0.5)
        try:
            streams = [decoder.submit(p, s) for p, s in zip(prompts, settings)]
            together = [drain(stream)[1] for stream in streams]
        finally:
            decoder.close()
        assert decoder.batch_sizes == [len(prompts)]
        assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_compiled_decoding_gives_generate_tokens(first_step_dir):
    model, tokenizer = load_model_and_tokenizer(first_step_dir, device="cpu")
    batch = tokenizer(["Once upon a time", "The little dog was sad because"], return_tensors="pt", padding=True,
                      padding_side="left")
    kwargs = dict(max_new_tokens=24, pad_token_id=tokenizer.pad_token_id)
    expected = model.generate(batch.input_ids, attention_mask=batch.attention_mask, do_sample=False, halt_threshold=0,
                              **kwargs)
    assert torch.equal(CompiledDecoder(model).generate(batch.input_ids, batch.attention_mask, **kwargs), expected)


@pytest.mark.slow
def test_onnx_step_gives_pytorch_greedy_tokens(first_step_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    result = export_main(["--model", str(first_step_dir), "--format", "onnx", "--output", str(tmp_path / "onnx"),
                          "--check_tokens", "40"])
    assert result["same_tokens"] and result["max_logit_difference"] < 1e-3

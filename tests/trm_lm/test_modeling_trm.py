"""TRMForCausalLM: config validation, causality, recursion/gradient structure, KV cache, ACT, save/load."""

import json
import math
import os
import textwrap
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache

from helpers import WITHOUT_TRM_LM, run_isolated
from trm_lm import TRMConfig, TRMForCausalLM
from trm_lm.modeling_trm import CACHE_FIELD


def tiny_config(**overrides) -> TRMConfig:
    values = dict(vocab_size=61, hidden_size=32, num_attention_heads=2, net_layers=2, latent_steps=2, cycles=2,
                  supervision_steps=2, max_position_embeddings=160, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    values.update(overrides)
    return TRMConfig(**values)


def tiny_model(seed=0, **overrides) -> TRMForCausalLM:
    torch.manual_seed(seed)
    return TRMForCausalLM(tiny_config(**overrides)).eval()


def make_halting_mixed(model, seed=1):
    """A halt head that halts some positions early and not others (a stand-in for a trained head)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = model.model.core.halt_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 2.0)
        head.bias.fill_(0.0)


# ----- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=30, num_attention_heads=4), "divisible"),
    (dict(latent_steps=0), "latent_steps"),
    (dict(supervision_steps=0), "supervision_steps"),
    (dict(cycles=-1), "cycles"),
    (dict(net_layers=1.5), "net_layers"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(input_injection="multiply"), "input_injection"),
    (dict(halt_threshold=1.5), "halt_threshold"),
    (dict(mixer="mlp", causal=True, sequence_length=8), "cannot be causal"),
    (dict(mixer="mlp", causal=False), "sequence_length"),
])
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_num_hidden_layers_counts_virtual_layers():
    cfg = tiny_config(net_layers=2, latent_steps=3, cycles=2, supervision_steps=4)
    assert cfg.num_hidden_layers == 4 * 2 * (3 + 1) * 2
    cfg.save_pretrained  # noqa: B018 - attribute exists
    reloaded = TRMConfig.from_dict({**cfg.to_dict(), "num_hidden_layers": 1})
    assert reloaded.num_hidden_layers == cfg.num_hidden_layers  # derived, never trusted from disk


def test_causal_model_rejects_non_causal_config():
    with pytest.raises(ValueError, match="causal"):
        TRMForCausalLM(tiny_config(causal=False))


def test_out_of_range_tokens_and_too_long_inputs_are_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[1, 2, 61]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, 161, dtype=torch.long))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="supervision_steps must be a positive integer"):
            model(torch.ones(1, 4, dtype=torch.long), supervision_steps=bad)


# ----- causality and recursion structure ---------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, dict(input_injection="concat"), dict(norm_position="pre")])
def test_future_tokens_do_not_change_past_logits(overrides):
    model = tiny_model(**overrides)
    ids = torch.randint(1, 61, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = torch.randint(1, 61, (2, 4))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_gradient_flows_only_through_the_last_cycle():
    cfg = dict(net_layers=2, latent_steps=3, cycles=3, supervision_steps=2)
    model = tiny_model(**cfg).train()
    calls = {"grad": 0, "no_grad": 0}

    def count(module, args, output):
        calls["grad" if output.requires_grad else "no_grad"] += 1

    for block in model.model.core.blocks:
        block.register_forward_hook(count)
    ids = torch.randint(1, 61, (2, 10))
    model(ids, labels=ids).loss.backward()
    per_cycle = (3 + 1) * 2  # (n + 1) net applications x blocks
    assert calls["grad"] == 2 * per_cycle  # one cycle with grad per supervision step
    assert calls["no_grad"] == 2 * (3 - 1) * per_cycle  # the other T-1 cycles
    assert all(p.grad is not None for n, p in model.named_parameters() if "halt_head" not in n)


def test_backprop_all_cycles_puts_every_cycle_on_the_graph_and_changes_the_gradient():
    cfg = dict(net_layers=1, latent_steps=1, cycles=3, supervision_steps=2)
    ids = torch.randint(1, 61, (2, 10))
    losses, grads = {}, {}
    for all_cycles in (False, True):
        model = tiny_model(backprop_all_cycles=all_cycles, **cfg).train()
        block = model.model.core.blocks[0]
        calls = {True: 0, False: 0}  # output.requires_grad -> block applications
        block.register_forward_hook(lambda module, args, output: calls.__setitem__(
            output.requires_grad, calls[output.requires_grad] + 1))
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses[all_cycles], grads[all_cycles] = loss.item(), block.mlp.down_proj.weight.grad.clone()
        applications = 2 * 3 * (1 + 1)  # N_sup x T x (n + 1), one block
        with_grad = applications if all_cycles else applications // 3  # else only the last of T = 3 cycles
        assert calls == {True: with_grad, False: applications - with_grad}
    assert losses[False] == pytest.approx(losses[True], abs=1e-6)  # the same forward computation
    assert not torch.allclose(grads[False], grads[True])  # more paths back to the same weights
    with pytest.raises(ValueError, match="backprop_all_cycles"):
        tiny_config(backprop_all_cycles="yes")


def test_deep_supervision_carry_is_detached_and_loss_is_step_mean():
    model = tiny_model(supervision_steps=3).train()
    ids = torch.randint(1, 61, (2, 10))
    out = model(ids, labels=ids)
    assert out.step_losses.shape == (3,)
    torch.testing.assert_close(out.loss.detach(), out.step_losses.mean())
    # the final logits are those of the last step: equal to an inference forward with all steps
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, out.logits.detach(), rtol=1e-5, atol=1e-5)


def test_halt_target_is_per_token():
    model = tiny_model(halt_loss_weight=1.0).train()
    ids = torch.randint(1, 61, (1, 6))
    out = model(ids, labels=ids)
    halt_logits = torch.zeros(1, 6, requires_grad=True)
    logits = out.logits.detach()
    # make exactly position 0's prediction correct
    labels = ids.clone()
    labels[0, 1] = int(logits[0, 0].argmax())
    labels[0, 2:] = (logits[0, 1:5].argmax(-1) + 1) % 61
    loss = model._step_loss(logits, halt_logits, labels, None) - model.loss_function(
        logits=logits, labels=labels, vocab_size=61)
    loss.backward()
    grad = halt_logits.grad[0, :5]
    assert grad[0] < 0 and (grad[1:] > 0).all()  # pushes up only where the token is right


def test_overfits_one_batch():
    model = tiny_model(supervision_steps=2).train()
    ids = torch.randint(1, 61, (2, 12))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = None
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


# ----- KV cache -----------------------------------------------------------------------------------------

CACHE_CONFIGS = [
    dict(supervision_steps=1, cycles=1, latent_steps=1),
    dict(supervision_steps=3, cycles=2, latent_steps=2),
    dict(supervision_steps=2, cycles=3, latent_steps=1, input_injection="concat"),
    dict(supervision_steps=2, cycles=2, latent_steps=2, norm_position="pre", position_encoding="learned"),
]


@pytest.mark.parametrize("overrides", CACHE_CONFIGS)
def test_cached_and_uncached_greedy_generation_agree(overrides):
    model = tiny_model(**overrides)
    prompt = torch.randint(1, 61, (1, 7))
    kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape[1] == 7 + 64
    assert torch.equal(cached, uncached)


def test_cache_slots_are_virtual_layers():
    model = tiny_model(supervision_steps=3, cycles=2, latent_steps=2)
    out = model(torch.randint(1, 61, (1, 5)), use_cache=True)
    cache = getattr(out, CACHE_FIELD)
    assert len(cache.layers) == model.config.num_hidden_layers == 3 * 2 * 3 * 2
    assert all(layer.keys.shape[2] == 5 for layer in cache.layers)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_cache_is_read_under_the_current_and_the_pre_5_24_keyword(keyword):
    """generate() passes `cache` from transformers 5.24 on and `past_key_values` before: both must be read."""
    model = tiny_model()
    ids = torch.randint(1, 61, (1, 9))
    announced = keyword == "past_key_values" and CACHE_FIELD == "cache"  # deprecated only where renamed
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :5], use_cache=True, **{keyword: cache})
        assert getattr(first, CACHE_FIELD) is cache and cache.get_seq_length() == 5
        rest = model(ids[:, 5:], use_cache=True, **{keyword: cache}).logits
    deprecations = [w for w in caught if "`past_key_values` is deprecated" in str(w.message)]
    assert len(deprecations) == (2 if announced else 0)
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="once"):
        model(ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


def test_batched_left_padded_generation_matches_single_prompts():
    model = tiny_model()
    a, b = torch.randint(1, 61, (1, 6)), torch.randint(1, 61, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    assert torch.equal(together[0, 6:], model.generate(a, **kwargs)[0, 6:])
    assert torch.equal(together[1, 6:], model.generate(b, **kwargs)[0, 3:])


# ----- ACT / per-token early exit ----------------------------------------------------------------------

def test_forced_halt_equals_one_supervision_step_and_saves_net_applications():
    model = tiny_model(supervision_steps=3)
    ids = torch.randint(1, 61, (1, 10))
    with torch.no_grad():
        model.model.core.halt_head.bias.fill_(20.0)  # P(halt) ~ 1 everywhere
        halted = model(ids, halt_threshold=0.5)
        one_step = model(ids, supervision_steps=1)
        full = model(ids)
    assert (halted.steps_used == 1).all() and (full.steps_used == 3).all()
    torch.testing.assert_close(halted.logits, one_step.logits)
    calls = []
    hook = model.model.core.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    prompt = torch.randint(1, 61, (1, 4))
    model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, halt_threshold=0.5)
    with_act = len(calls)
    calls.clear()
    model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, halt_threshold=0)
    hook.remove()
    assert with_act * 3 == len(calls)  # one supervision step instead of three


@pytest.mark.parametrize("overrides", [dict(supervision_steps=3), dict(supervision_steps=4, cycles=1, latent_steps=1)])
def test_act_incremental_decoding_matches_full_sequence_reference(overrides):
    """Semantics: a halted token is frozen and its K/V for skipped steps are copies of its last computed step.

    Reference: one uncached forward over the whole sequence. Under test: token-by-token with the cache,
    where a halted single token skips the network entirely and only copies K/V.
    """
    assert_act_decoding_matches_the_full_sequence(tiny_model(**overrides))


def assert_act_decoding_matches_the_full_sequence(model, length=40):
    """Token by token through the cache at halt threshold 0.5 (a halted token skips the network) against one
    uncached forward: the same steps per token and the same logits. Returns the cache."""
    make_halting_mixed(model)
    ids = torch.randint(1, 61, (1, length))
    with torch.no_grad():
        reference = model(ids, use_cache=False, halt_threshold=0.5)
        cache = DynamicCache(config=model.config)
        pieces, steps = [], []
        for t in range(ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True, halt_threshold=0.5)
            pieces.append(out.logits)
            steps.append(out.steps_used)
    used = reference.steps_used
    assert used.min() < model.config.supervision_steps and used.max() > 1  # halting really is mixed
    assert torch.equal(torch.cat(steps, 1), used)
    torch.testing.assert_close(torch.cat(pieces, 1), reference.logits, rtol=1e-4, atol=1e-4)
    return cache


def test_act_generation_cached_equals_uncached_and_halted_state_is_frozen():
    model = tiny_model(supervision_steps=3)
    make_halting_mixed(model)
    prompt = torch.randint(1, 61, (1, 5))
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, halt_threshold=0.5)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))
    with torch.no_grad():
        out = model(cached, halt_threshold=0.5, output_step_topk=2)
    # a position that halted after step s predicts the same thing at every later step
    for b, t in zip(*torch.nonzero(out.steps_used < 3, as_tuple=True)):
        s = int(out.steps_used[b, t])
        for later in range(s, 3):
            assert torch.equal(out.step_top_ids[later, b, t], out.step_top_ids[s - 1, b, t])


def count_block_rows(model):
    """Hook every block; returns (rows, remove): rows[0] sums the batch rows each block call computed."""
    rows = [0]

    def count(module, args):
        rows[0] += args[0].shape[0]
    handles = [block.register_forward_pre_hook(count) for block in model.model.core.blocks]
    return rows, lambda: [h.remove() for h in handles]


def test_act_in_a_batch_halted_rows_leave_and_tokens_equal_batch_one():
    """A batch decoded with ACT gives each row the tokens it gets alone, and computes only the rows still running:
    the rows the blocks see add up to exactly what the rows run one by one compute."""
    model = tiny_model(supervision_steps=4, cycles=1, latent_steps=1)
    make_halting_mixed(model)
    prompts = torch.randint(1, 61, (4, 6))
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, halt_threshold=0.5)
    rows, remove = count_block_rows(model)
    batch = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kwargs)
    batch_rows, rows[0] = rows[0], 0
    alone = torch.cat([model.generate(p[None], **kwargs) for p in prompts])
    alone_rows, rows[0] = rows[0], 0
    model.generate(prompts, attention_mask=torch.ones_like(prompts), **{**kwargs, "halt_threshold": 0})
    remove()
    assert torch.equal(batch, alone)
    assert batch_rows == alone_rows < rows[0]  # fewer than with every row computing every step


def test_act_in_a_padded_batch_matches_each_row_alone():
    model = tiny_model(supervision_steps=3)
    make_halting_mixed(model)
    lengths = [3, 7, 5]
    prompts = [torch.randint(1, 61, (n,)) for n in lengths]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding, as generate() expects
        ids[row, 7 - len(prompt):], mask[row, 7 - len(prompt):] = prompt, 1
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, halt_threshold=0.5)
    batch = model.generate(ids, attention_mask=mask, **kwargs)[:, 7:]
    for row, prompt in enumerate(prompts):
        assert torch.equal(batch[row], model.generate(prompt[None], **kwargs)[0, len(prompt):])


@pytest.mark.parametrize("halt_threshold", [None, 0.5])
def test_static_cache_generation_equals_uncached(halt_threshold):
    """A prefill into an empty StaticCache gets no mask from transformers: attention must still be causal, and
    the ACT copy-forward must read this chunk's positions, not the end of the preallocated buffer."""
    model = tiny_model(supervision_steps=3)
    make_halting_mixed(model)
    prompt = torch.randint(1, 61, (2, 9))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                  halt_threshold=halt_threshold)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), uncached)
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=48)
        prefill = model(prompt, cache=cache, use_cache=True, halt_threshold=halt_threshold).logits
        torch.testing.assert_close(prefill, model(prompt, use_cache=False, halt_threshold=halt_threshold).logits)


def cache_numel(cache) -> int:
    return sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers
               if getattr(layer, "keys", None) is not None)


@pytest.mark.parametrize("halt_threshold", [None, 0.5])
def test_shared_step_cache_divides_kv_memory_and_agrees_across_caches_and_batches(halt_threshold):
    """share_step_cache: one step's slots for all N_sup steps. A single chunk (no past) computes exactly the full
    forward; decoding differs (earlier tokens are seen at their last step) but is the same with a DynamicCache
    or a StaticCache, in a batch or alone."""
    model = tiny_model(supervision_steps=3)
    make_halting_mixed(model)
    prompts = torch.randint(1, 61, (3, 7))
    with torch.no_grad():
        exact, shared = DynamicCache(config=model.config), DynamicCache(config=model.config)
        reference = model(prompts, cache=exact, halt_threshold=halt_threshold).logits
        logits = model(prompts, cache=shared, halt_threshold=halt_threshold, share_step_cache=True).logits
    torch.testing.assert_close(logits, reference)
    assert cache_numel(shared) * 3 == cache_numel(exact)
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, halt_threshold=halt_threshold,
                  share_step_cache=True)
    mask = torch.ones_like(prompts)
    dynamic = model.generate(prompts, attention_mask=mask, **kwargs)
    assert torch.equal(model.generate(prompts, attention_mask=mask, cache_implementation="static", **kwargs), dynamic)
    assert torch.equal(torch.cat([model.generate(p[None], **kwargs) for p in prompts]), dynamic)
    assert not torch.equal(model.generate(prompts, attention_mask=mask, **{**kwargs, "share_step_cache": False}),
                           dynamic)  # it is an approximation, and the exact mode is not affected by it


def test_shared_step_cache_is_inference_only():
    model = tiny_model().train()
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="inference"):
        model(ids, cache=DynamicCache(config=model.config), share_step_cache=True)


def test_halt_threshold_validation_and_its_one_meaning():
    """None = the config's threshold, 0 = off, (0, 1] = a P(halt); nothing else (no "> 1 = off")."""
    model = tiny_model(supervision_steps=3)
    ids = torch.ones(1, 3, dtype=torch.long)
    for bad in (1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match="halt_threshold"):
            model(ids, halt_threshold=bad)
    make_halting_mixed(model)
    prompt = torch.randint(1, 61, (1, 6))
    steps = lambda **kw: model(prompt, **kw).steps_used  # noqa: E731
    assert (steps(halt_threshold=0) == 3).all() and (steps() == 3).all()  # off; the config sets none
    model.config.halt_threshold = 0.5
    assert torch.equal(steps(), steps(halt_threshold=0.5)) and (steps() < 3).any()  # None = the config's
    assert (steps(halt_threshold=0) == 3).all()  # 0 = off, whatever the config says
    assert (steps(halt_threshold=0, halt_criterion="kl") == 3).all()
    assert (steps(halt_criterion="entropy") == 3).all()  # the config's P(halt) is not a threshold in nats
    model.train()
    with pytest.raises(ValueError, match="inference"):
        model(ids, labels=ids, halt_threshold=0.5)


def test_inspect_reports_steps_and_per_step_predictions():
    model = tiny_model(supervision_steps=3)
    make_halting_mixed(model)
    prompt = torch.randint(1, 61, (1, 5), generator=torch.Generator().manual_seed(0))
    traces = model.inspect(prompt, top_k=2, halt_threshold=0.5, max_new_tokens=10, min_new_tokens=10,
                           do_sample=False)
    generated = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, halt_threshold=0.5)
    assert [t.token_id for t in traces] == generated[0, 5:].tolist()
    assert [t.position for t in traces] == list(range(5, 15))
    for t in traces:
        assert 1 <= t.steps_used <= 3 and len(t.step_predictions) == t.steps_used
        assert [p.step for p in t.step_predictions] == list(range(1, t.steps_used + 1))
        assert all(len(p.top_ids) == len(p.top_probs) == 2 and p.top_probs[0] >= p.top_probs[1]
                   for p in t.step_predictions)
        # greedy: the last step's argmax, EOS aside (min_new_tokens forbids it here)
        assert [i for i in t.step_predictions[-1].top_ids if i != model.config.eos_token_id][0] == t.token_id
        assert t.token is None and t.step_predictions[0].top_tokens is None  # no tokenizer, nothing decoded
    assert len({t.steps_used for t in traces}) >= 2  # the mixed head exits some tokens early


# ----- save / load --------------------------------------------------------------------------------------

def test_save_load_round_trip_identical_logits(tmp_path):
    model = tiny_model(supervision_steps=2, input_injection="concat")
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "modeling_trm.py", "configuration_trm.py", "core.py"} <= files
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_trm.TRMForCausalLM"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TRMForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(1, 61, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert AutoConfig.from_pretrained(tmp_path).num_hidden_layers == model.config.num_hidden_layers


def test_trust_remote_code_load_in_clean_process(tmp_path):
    model = tiny_model(supervision_steps=2)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    ids = torch.randint(1, 61, (1, 8))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = WITHOUT_TRM_LM + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(data["ids"]).logits, data["logits"], rtol=0, atol=0)
        out = model.generate(data["ids"], max_new_tokens=8, do_sample=False)
        assert out.shape[1] == 16
        print("REMOTE-OK")
    """)
    result = run_isolated(script, tmp_path)
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


def test_pickle_only_and_corrupt_checkpoints_give_clear_errors(tmp_path):
    model = tiny_model()
    good = tmp_path / "good"
    model.save_pretrained(good)
    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    (pickle_dir / "config.json").write_text((good / "config.json").read_text())
    torch.save(model.state_dict(), pickle_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        AutoModelForCausalLM.from_pretrained(pickle_dir)
    with pytest.raises(ValueError, match="safetensors"):
        TRMForCausalLM.from_pretrained(good, use_safetensors=False)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for name in os.listdir(good):
        (truncated / name).write_bytes((good / name).read_bytes())
    data = (good / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        AutoModelForCausalLM.from_pretrained(truncated)


def test_bf16_load_runs():
    model = tiny_model()
    with torch.no_grad():
        reference = model(torch.randint(1, 61, (1, 6))).logits
    half = model.to(torch.bfloat16)
    with torch.no_grad():
        logits = half(torch.randint(1, 61, (1, 6))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all() and reference.shape == logits.shape


# ----- training-free stopping rules ----------------------------------------------------------------------

def test_entropy_criterion_with_huge_threshold_stops_after_one_step():
    model = tiny_model(supervision_steps=3)
    ids = torch.randint(1, 61, (1, 9))
    with torch.no_grad():
        stopped = model(ids, halt_threshold=100.0, halt_criterion="entropy")
        one_step = model(ids, supervision_steps=1)
        never = model(ids, halt_threshold=0.0, halt_criterion="entropy")
    assert (stopped.steps_used == 1).all() and (never.steps_used == 3).all()
    torch.testing.assert_close(stopped.logits, one_step.logits)


def test_kl_criterion_incremental_matches_full_reference():
    model = tiny_model(supervision_steps=3)
    ids = torch.randint(1, 61, (1, 30))
    with torch.no_grad():
        full = model(ids, halt_threshold=0.0, halt_criterion="kl")
        kl = [model(ids, halt_threshold=t, halt_criterion="kl").steps_used.float().mean() for t in (1e-4, 1e-2, 1.0)]
        # pick a threshold that splits the tokens, then decode token by token
        threshold = float(torch.quantile(_step_kl(model, ids), 0.5))
        reference = model(ids, halt_threshold=threshold, halt_criterion="kl")
        cache = DynamicCache(config=model.config)
        pieces = [model(ids[:, t:t + 1], cache=cache, use_cache=True, halt_threshold=threshold,
                        halt_criterion="kl") for t in range(30)]
    assert (full.steps_used == 3).all()  # KL is never <= 0 between different distributions
    assert kl[0] >= kl[1] >= kl[2] and kl[2] == 2.0  # the first step can never stop under KL
    assert torch.equal(torch.cat([p.steps_used for p in pieces], 1), reference.steps_used)
    torch.testing.assert_close(torch.cat([p.logits for p in pieces], 1), reference.logits, rtol=1e-4, atol=1e-4)


def _step_kl(model, ids):
    out = model(ids, output_step_topk=model.config.vocab_size)
    probs = torch.zeros(out.step_top_ids.shape[0], ids.shape[1], model.config.vocab_size)
    for s in range(probs.shape[0]):
        probs[s].scatter_(-1, out.step_top_ids[s, 0], out.step_top_probs[s, 0])
    return (probs[1] * (probs[1].log() - probs[0].log())).sum(-1)


@pytest.mark.parametrize("criterion, bad", [("entropy", -1.0), ("kl", float("inf")), ("median", 0.5)])
def test_bad_halt_criteria_are_rejected(criterion, bad):
    with pytest.raises(ValueError, match="halt_"):
        tiny_model()(torch.ones(1, 3, dtype=torch.long), halt_threshold=bad, halt_criterion=criterion)


# ----- transformers API: hidden states, attentions, tuples, training with a config threshold -------------

def test_output_hidden_states_and_attentions_cover_every_virtual_layer():
    model = tiny_model()
    ids = torch.randint(1, 61, (2, 7))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True, use_cache=False)
        plain = model(ids, use_cache=False)
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids) * model.model.embed_scale)
    assert all(h.shape == (2, 7, 32) for h in out.hidden_states)
    assert all(a.shape == (2, 2, 7, 7) for a in out.attentions)
    weights = torch.stack(out.attentions)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    assert (weights.triu(1) == 0).all()  # causal
    assert torch.equal(out.logits, plain.logits)  # recording changes nothing
    assert model(ids, use_cache=False).hidden_states is None  # and costs nothing unless asked


def test_attentions_with_the_cache_equal_the_full_forward_rows():
    model = tiny_model()
    ids = torch.randint(1, 61, (1, 6))
    with torch.no_grad():
        full = model(ids, output_attentions=True, use_cache=False).attentions
        cache = DynamicCache(config=model.config)
        model(ids[:, :5], cache=cache, use_cache=True)
        last = model(ids[:, 5:], cache=cache, use_cache=True, output_attentions=True).attentions
    for a, b in zip(full, last):
        torch.testing.assert_close(a[:, :, 5:], b, rtol=1e-5, atol=1e-6)


def test_return_dict_false_gives_a_tuple():
    model = tiny_model()
    ids = torch.randint(1, 61, (1, 5))
    out = model(ids, return_dict=False, use_cache=False)
    assert isinstance(out, tuple) and torch.equal(out[0], model(ids, use_cache=False).logits)


def test_a_config_threshold_does_not_block_fine_tuning_but_an_explicit_one_does():
    model = tiny_model(halt_threshold=0.5).train()
    ids = torch.randint(1, 61, (2, 6))
    model(ids, labels=ids).loss.backward()  # the config's inference setting is ignored in training
    with pytest.raises(ValueError, match="inference-time"):
        model(ids, labels=ids, halt_threshold=0.5)


def test_halting_loss_reads_shift_labels():
    model = tiny_model(halt_loss_weight=1.0).eval()
    ids = torch.randint(1, 61, (2, 6))
    shifted = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        from_labels = model(ids, labels=ids, use_cache=False).loss
        from_shift = model(ids, labels=ids, shift_labels=shifted, use_cache=False).loss
        other = model(ids, labels=ids, shift_labels=shifted.roll(1, dims=1), use_cache=False).loss
    torch.testing.assert_close(from_labels, from_shift)
    assert not torch.isclose(from_labels, other)


def test_from_pretrained_with_state_dict_and_no_path():
    model = tiny_model()
    again = TRMForCausalLM.from_pretrained(None, config=model.config, state_dict=model.state_dict()).eval()
    ids = torch.randint(1, 61, (1, 5))
    assert torch.equal(again(ids).logits, model(ids).logits)


def assert_twice_the_trained_depth_is_cached_exactly(model):
    """Greedy decoding at twice the trained supervision steps, ACT off and at 0.5: cached = uncached.
    Returns the cached forward outputs of a prompt at that depth and at the trained one."""
    make_halting_mixed(model)
    prompt = torch.randint(1, 61, (1, 5))
    depth = 2 * model.config.supervision_steps
    for halt_threshold in (None, 0.5):
        kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, supervision_steps=depth,
                      halt_threshold=halt_threshold, pad_token_id=0)
        assert torch.equal(model.generate(prompt, use_cache=True, **kwargs),
                           model.generate(prompt, use_cache=False, **kwargs))
    with torch.no_grad():
        return model(prompt, supervision_steps=depth, use_cache=True), model(prompt, use_cache=True)


def test_test_time_depth_beyond_the_trained_steps_is_cached_exactly():
    """More supervision steps than trained: the cache gets the extra slots and stays exact, ACT included."""
    model = tiny_model(supervision_steps=2)
    deeper, trained = assert_twice_the_trained_depth_is_cached_exactly(model)
    assert len(getattr(deeper, CACHE_FIELD).layers) == 2 * model.config.num_hidden_layers
    assert not torch.allclose(deeper.logits, trained.logits)


def test_truncated_normal_init_has_the_nominal_std():
    """Official trunc_normal_init_: the std AFTER truncation at +-2 std is the one asked for (torch's is 0.88x)."""
    from trm_lm.core import trunc_normal_

    torch.manual_seed(0)
    weight = trunc_normal_(torch.empty(512, 512), std=0.05)
    assert abs(float(weight.std()) / 0.05 - 1) < 0.02
    assert float(weight.abs().max()) <= 2 * 0.05 / 0.8796 + 1e-6  # cut at 2 std of the widened normal
    model = tiny_model(hidden_size=64)
    q_proj = model.model.core.blocks[0].mixer.qkv_proj.weight  # std 1/sqrt(fan_in)
    assert abs(float(q_proj.detach().std()) * math.sqrt(64) - 1) < 0.1

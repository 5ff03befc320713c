"""The app's batched decoder (trm_lm/serving.py): many requests in one batch give exactly what each gives alone."""

import threading

import pytest
import torch
from transformers import GenerationConfig

from trm_lm.generation import GenerationSettings, generate_text
from trm_lm import serving
from trm_lm.serving import BatchedDecoder

# different lengths, so that the batch is left-padded and every row's positions start at its own first token
PROMPTS = ["Once upon a time", "Lily and Tom went to the park with a big red ball and the dog.", "The cat",
           "One day, a little girl named Lily found a toy car under the tree in the garden."]




def drain(stream):
    """(text pieces joined, GenerationResult) of one stream."""
    text = ""
    while True:
        try:
            text += next(stream)
        except StopIteration as finished:
            return text, finished.value


def assert_same_traces(traces, expected):
    """Same tokens, steps, top-k ids and decoded text; probabilities equal up to float32 rounding (a padded
    batch sums in another order)."""
    assert len(traces) == len(expected)
    for got, want in zip(traces, expected):
        assert (got.position, got.token_id, got.steps_used, got.token) == \
            (want.position, want.token_id, want.steps_used, want.token)
        assert [(p.step, p.top_ids, p.top_tokens) for p in got.step_predictions] == \
            [(p.step, p.top_ids, p.top_tokens) for p in want.step_predictions]
        for p, q in zip(got.step_predictions, want.step_predictions):
            assert p.top_probs == pytest.approx(q.top_probs, rel=1e-5, abs=1e-7)


def decode_together(model, tokenizer, prompts, settings_list, trace_top_k=0, **decoder_kwargs):
    decoder = BatchedDecoder(model, tokenizer, gather_seconds=0.5, **decoder_kwargs)
    try:
        streams = [decoder.submit(p, s, trace_top_k=trace_top_k) for p, s in zip(prompts, settings_list)]
        return [drain(stream) for stream in streams], decoder.batch_sizes
    finally:
        decoder.close()


@pytest.mark.parametrize("temperature, halt_threshold, repetition_penalty, share_step_cache", [
    (0.0, 0, 1.0, False), (0.0, 0.5, 1.3, False), (0.9, 0, 1.0, False), (0.9, 0.5, 1.2, False), (0.0, 0.5, 1.0, True)])
def test_a_batch_gives_each_request_what_generate_gives_alone(model_and_tokenizer, temperature, halt_threshold,
                                                              repetition_penalty, share_step_cache):
    model, tokenizer = model_and_tokenizer
    settings = [GenerationSettings(max_new_tokens=24 + 4 * i, temperature=temperature, top_p=0.9, seed=100 + i,
                                   halt_threshold=halt_threshold, repetition_penalty=repetition_penalty,
                                   share_step_cache=share_step_cache)
                for i in range(len(PROMPTS))]
    alone = [generate_text(model, tokenizer, p, s) for p, s in zip(PROMPTS, settings)]
    together, batch_sizes = decode_together(model, tokenizer, PROMPTS, settings)
    assert batch_sizes == [len(PROMPTS)]  # really one batch
    for (streamed, result), reference in zip(together, alone):
        assert result.token_ids == reference.token_ids
        assert streamed == result.text == reference.text
    assert len({tuple(r.token_ids[0]) for _, r in together}) == len(PROMPTS)


@pytest.mark.parametrize("temperature, halt_threshold, trace_top_k", [(0.9, 0, 0), (0.9, 0.5, 0), (0.0, 0.5, 3)])
def test_requests_arriving_mid_decode_join_the_batch_and_get_what_they_get_alone(model_and_tokenizer, temperature,
                                                                                 halt_threshold, trace_top_k):
    """Continuous batching: newcomers are prefilled in their own cache and merged (left-padded) into the
    running batch; the first wave has a longer history than the batch it joins, the second a shorter one.
    Every row still decodes exactly as generate() / model.inspect() alone."""
    model, tokenizer = model_and_tokenizer
    settings = [GenerationSettings(max_new_tokens=48 - 6 * i, temperature=temperature, top_p=0.9, seed=30 + i,
                                   halt_threshold=halt_threshold) for i in range(len(PROMPTS))]
    alone = [generate_text(model, tokenizer, p, s) for p, s in zip(PROMPTS, settings)]
    decoder = BatchedDecoder(model, tokenizer, gather_seconds=0.0)
    # forward pass 2 (the first request's first decoding step) and 8 wait until the test has submitted a wave
    waves = {2: (threading.Event(), threading.Event(), [1, 3]), 8: (threading.Event(), threading.Event(), [2])}
    passes, step = [], decoder._step

    def gated_step(*args, **kwargs):
        passes.append(1)
        if len(passes) in waves:
            reached, release, _ = waves[len(passes)]
            reached.set()
            assert release.wait(30)
        return step(*args, **kwargs)

    decoder._step = gated_step
    try:
        streams = {0: decoder.submit(PROMPTS[0], settings[0], trace_top_k=trace_top_k)}
        for reached, release, members in waves.values():
            assert reached.wait(30)
            streams.update({i: decoder.submit(PROMPTS[i], settings[i], trace_top_k=trace_top_k) for i in members})
            release.set()
        results = [drain(streams[i]) for i in range(len(PROMPTS))]
    finally:
        decoder.close()
    assert decoder.joined == 3 and decoder.batch_sizes == [1, 2, 1]
    for (streamed, result), reference, prompt, s in zip(results, alone, PROMPTS, settings):
        assert result.token_ids == reference.token_ids
        assert streamed == result.text == reference.text
        if trace_top_k:
            ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt)["input_ids"]])
            expected = model.inspect(ids, tokenizer=tokenizer, top_k=trace_top_k, halt_threshold=halt_threshold,
                                     generation_config=GenerationConfig(do_sample=False, max_new_tokens=s.max_new_tokens,
                                                                        pad_token_id=tokenizer.pad_token_id))
            assert_same_traces(result.traces, expected)


def test_a_seeded_request_does_not_depend_on_its_batch_mates(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    mine = GenerationSettings(max_new_tokens=30, temperature=1.0, seed=7)
    (alone,), _ = decode_together(model, tokenizer, [PROMPTS[0]], [mine])
    strangers = [GenerationSettings(max_new_tokens=10 + i, temperature=1.0) for i in range(3)]  # unseeded
    together, sizes = decode_together(model, tokenizer, PROMPTS[1:] + [PROMPTS[0]], strangers + [mine])
    assert sizes == [4] and together[-1][1].token_ids == alone[1].token_ids


def test_traces_equal_model_inspect(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = GenerationSettings(max_new_tokens=20, temperature=0.0, halt_threshold=0.5)
    together, _ = decode_together(model, tokenizer, PROMPTS[:2], [settings] * 2, trace_top_k=3)
    for prompt, (_, result) in zip(PROMPTS[:2], together):
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt)["input_ids"]])
        expected = model.inspect(ids, tokenizer=tokenizer, top_k=3, halt_threshold=0.5, generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id))
        assert_same_traces(result.traces, expected)
        assert {t.steps_used for t in result.traces} == {1, 2}  # the fixture's halt head exits some early


def test_different_trm_controls_are_decoded_in_separate_batches(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = [GenerationSettings(max_new_tokens=8, temperature=0.0, supervision_steps=steps) for steps in (1, 2, 1, 4)]
    together, sizes = decode_together(model, tokenizer, PROMPTS, settings)
    assert sorted(sizes) == [1, 1, 2]
    for prompt, s, (_, result) in zip(PROMPTS, settings, together):
        assert result.token_ids == generate_text(model, tokenizer, prompt, s).token_ids


def test_a_reader_that_goes_away_leaves_the_batch_and_the_others_finish(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = GenerationSettings(max_new_tokens=40, temperature=0.0)
    decoder = BatchedDecoder(model, tokenizer, gather_seconds=0.5)
    try:
        streams = [decoder.submit(p, settings) for p in PROMPTS[:3]]
        next(streams[0])
        streams[0].close()  # what gradio does when the user presses Stop
        results = [drain(stream)[1] for stream in streams[1:]]
    finally:
        decoder.close()
    for prompt, result in zip(PROMPTS[1:3], results):
        assert result.token_ids == generate_text(model, tokenizer, prompt, settings).token_ids


def test_bad_requests_are_refused_when_submitted(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    decoder = BatchedDecoder(model, tokenizer)
    try:
        with pytest.raises(ValueError, match="prompt"):
            decoder.submit("", GenerationSettings())
        with pytest.raises(ValueError, match="supervision_steps must be in"):
            decoder.submit("Once", GenerationSettings(max_new_tokens=10, supervision_steps=99))
        with pytest.raises(ValueError, match="num_return_sequences=1"):
            decoder.submit("Once", GenerationSettings(max_new_tokens=10, num_return_sequences=2))
        # the thread still serves after refusing those
        assert drain(decoder.submit("Once", GenerationSettings(max_new_tokens=3, temperature=0.0)))[1].token_ids
    finally:
        decoder.close()
    with pytest.raises(RuntimeError, match="closed"):
        decoder.submit("Once", GenerationSettings())
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchedDecoder(model, tokenizer, max_batch_size=0)


def test_an_error_in_decoding_reaches_every_reader_and_the_thread_goes_on(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    decoder = BatchedDecoder(model, tokenizer, gather_seconds=0.3)
    calls = {"n": 0}
    original = model.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated out of memory")
        return original(*args, **kwargs)

    try:
        monkeypatch.setattr(model, "forward", failing_forward)
        streams = [decoder.submit(p, GenerationSettings(max_new_tokens=4, temperature=0.0)) for p in PROMPTS[:2]]
        for stream in streams:
            with pytest.raises(RuntimeError, match="simulated out of memory"):
                drain(stream)
        assert drain(decoder.submit("Once", GenerationSettings(max_new_tokens=3, temperature=0.0)))[1].token_ids
    finally:
        decoder.close()


def error_of_one_reader(decoder) -> str | None:
    """Submit one greedy request and read it in a thread; its RuntimeError's message (None: it finished).
    Fails if the reader is still waiting after 30 s."""
    outcome = {}

    def read():
        try:
            drain(decoder.submit(PROMPTS[0], GenerationSettings(max_new_tokens=4, temperature=0.0)))
            outcome["error"] = None
        except RuntimeError as error:
            outcome["error"] = str(error)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "the reader was left waiting"
    return outcome["error"]


def test_a_dead_decoding_thread_fails_its_readers_instead_of_leaving_them_waiting(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    decoder = BatchedDecoder(model, tokenizer, gather_seconds=0.0)

    def broken_take(*args, **kwargs):  # outside any batch: this ends the decoding thread
        raise RuntimeError("a bug in the scheduler")

    monkeypatch.setattr(decoder, "_take", broken_take)
    assert error_of_one_reader(decoder) == "the decoder stopped: RuntimeError: a bug in the scheduler"
    with pytest.raises(RuntimeError, match="closed"):  # and the decoder says it is closed
        decoder.submit(PROMPTS[0], GenerationSettings(max_new_tokens=4))


def test_a_request_queued_while_the_decoder_ends_is_failed_not_left_waiting(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    decoder = BatchedDecoder(model, tokenizer, gather_seconds=0.0)
    queue_put = decoder._queue.put

    def put_as_the_thread_ends(item, *args, **kwargs):  # submit has checked that the decoder is open ...
        queue_put(serving._CLOSE)  # ... and the thread ends before the request is queued
        decoder._thread.join(1.0)  # (without the queue lock it has swept the queue for the last time by now)
        queue_put(item, *args, **kwargs)

    decoder._queue.put = put_as_the_thread_ends
    assert error_of_one_reader(decoder) == "the decoder was closed before this request ran"


def test_many_threads_submitting_at_once_are_batched(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    decoder = BatchedDecoder(model, tokenizer, max_batch_size=8, gather_seconds=0.2)
    results, barrier = {}, threading.Barrier(12)

    def user(i):
        settings = GenerationSettings(max_new_tokens=12, temperature=0.8, seed=i)
        barrier.wait()
        results[i] = drain(decoder.submit(PROMPTS[i % 4], settings))[1]

    threads = [threading.Thread(target=user, args=(i,)) for i in range(12)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        decoder.close()
    assert max(decoder.batch_sizes) > 1 and max(decoder.batch_sizes) <= 8 and sum(decoder.batch_sizes) == 12
    for i, result in results.items():
        settings = GenerationSettings(max_new_tokens=12, temperature=0.8, seed=i)
        assert result.token_ids == generate_text(model, tokenizer, PROMPTS[i % 4], settings).token_ids

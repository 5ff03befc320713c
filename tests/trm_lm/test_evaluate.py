"""trm_lm.evaluate: bits per byte of any causal LM, tested with a tiny random Llama."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trm_lm.evaluate import bits_per_byte, main, sliding_windows

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_llama(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer)


def protocol_counts(tokenizer, documents):
    """Predicted tokens (document tokens + EOS) and bytes (UTF-8 bytes + 1) of the protocol."""
    tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in documents)
    return tokens, sum(len(d.encode("utf-8")) + 1 for d in documents)


def test_untrained_model_is_near_uniform(model, tokenizer, stories):
    documents = stories[300:306]
    result = bits_per_byte(model, tokenizer, documents, batch_size=4)
    tokens, n_bytes = protocol_counts(tokenizer, documents)
    assert (result["tokens"], result["bytes"], result["documents"]) == (tokens, n_bytes, 6)
    uniform_bpb = math.log2(len(tokenizer)) * tokens / n_bytes
    # small random init: logits are close to 0, so the loss is ln(V) up to a few percent
    assert result["bits_per_byte"] == pytest.approx(uniform_bpb, rel=0.03)
    assert result["loss_per_token"] == pytest.approx(math.log(len(tokenizer)), rel=0.03)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll_nats"] / tokens), rel=1e-9)
    assert result["bits_per_byte"] == pytest.approx(result["nll_nats"] / (math.log(2) * n_bytes), rel=1e-12)


def test_zero_logits_give_exactly_uniform_bpb(model, tokenizer, stories):
    uniform = copy.deepcopy(model)
    torch.nn.init.zeros_(uniform.lm_head.weight)  # every logit 0: NLL = ln(V) for every scored token
    documents = stories[310:315]
    tokens, n_bytes = protocol_counts(tokenizer, documents)
    for context_length in (None, 64):  # the sliding window scores each token exactly once too
        result = bits_per_byte(uniform, tokenizer, documents, context_length=context_length)
        assert result["tokens"] == tokens
        assert result["bits_per_byte"] == pytest.approx(math.log2(len(tokenizer)) * tokens / n_bytes, rel=1e-6)


def test_batch_size_does_not_change_the_result(model, tokenizer, stories):
    documents = [stories[320][:50], stories[321], stories[322][:300], stories[323], "Hi.", stories[324][:700]]
    one = bits_per_byte(model, tokenizer, documents, batch_size=1)
    four = bits_per_byte(model, tokenizer, documents, batch_size=4)
    assert four["tokens"] == one["tokens"]
    assert four["nll_nats"] == pytest.approx(one["nll_nats"], rel=1e-4)


@pytest.mark.parametrize(
    "num_targets, context_length", [(5, 8), (8, 8), (9, 8), (100, 8), (101, 9), (37, 2), (600, 512)]
)
def test_sliding_windows_score_every_target_once(num_targets, context_length):
    windows = sliding_windows(num_targets, context_length)
    scored = []
    for begin, end, first_scored in windows:
        assert 0 <= begin <= first_scored < end <= num_targets and end - begin <= context_length
        scored += range(first_scored, end)  # input positions whose next token is scored
        if begin > 0:  # every scored target sees at least context_length - stride tokens
            assert first_scored - begin + 1 >= context_length - context_length // 2
    assert scored == list(range(num_targets))
    assert windows[-1][1] == num_targets


def test_sliding_window_agrees_with_full_context_when_it_fits(model, tokenizer, stories):
    long_document = "\n".join(stories[330:336])
    tokens, _ = protocol_counts(tokenizer, [long_document])
    full = bits_per_byte(model, tokenizer, [long_document], context_length=100_000)
    exact_fit = bits_per_byte(model, tokenizer, [long_document], context_length=tokens)
    windowed = bits_per_byte(model, tokenizer, [long_document], context_length=tokens // 3)
    assert exact_fit["nll_nats"] == pytest.approx(full["nll_nats"], rel=1e-5)
    assert windowed["tokens"] == full["tokens"] == tokens
    assert windowed["nll_nats"] != full["nll_nats"]  # shorter context really changed the scores
    # an untrained model hardly uses its context
    assert windowed["bits_per_byte"] == pytest.approx(full["bits_per_byte"], rel=0.05)


def test_overfit_model_has_much_lower_bpb(tokenizer, stories):
    model = tiny_llama(tokenizer, seed=1)
    documents = sorted(stories[400:450], key=len)[:2]  # two short stories
    before = bits_per_byte(model, tokenizer, documents)["bits_per_byte"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    sequences = [torch.tensor([[bos] + tokenizer(d)["input_ids"] + [eos]]) for d in documents]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        for ids in sequences:
            model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = bits_per_byte(model, tokenizer, documents)
    assert after["bits_per_byte"] < 0.3 * before
    assert model.training  # the evaluation restored the training mode
    unseen = bits_per_byte(model, tokenizer, stories[500:502])["bits_per_byte"]
    assert unseen > 2 * after["bits_per_byte"]


def test_forward_kwargs_reach_the_model(model, tokenizer, monkeypatch):
    seen = []
    original_forward = model.forward

    def spy(*args, halt_threshold=None, **kwargs):  # a Llama has no halt_threshold; TRM does
        seen.append((halt_threshold, kwargs["use_cache"], kwargs["attention_mask"].shape))
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    documents = ["One story.", "Another, longer story."]
    bits_per_byte(model, tokenizer, documents, batch_size=2, forward_kwargs={"halt_threshold": 0.9})
    assert len(seen) == 1 and seen[0][:2] == (0.9, False) and seen[0][2][0] == 2


def test_bad_input(model, tokenizer):
    with pytest.raises(ValueError, match="no documents"):
        bits_per_byte(model, tokenizer, [])
    with pytest.raises(ValueError, match="context_length must be at least 2"):
        bits_per_byte(model, tokenizer, ["A story."], context_length=1)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, model, tokenizer, stories):
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    validation = folder / "valid.jsonl"
    validation.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories[600:610]), encoding="utf-8")
    return folder, validation


def test_cli_in_process_matches_the_function(saved_model, model, tokenizer, stories, tmp_path):
    folder, validation = saved_model
    out = tmp_path / "bpb.json"
    main(["--model", str(folder), "--validation_file", str(validation), "--max_documents", "4",
          "--batch_size", "3", "--device", "cpu", "--json", str(out)])
    written = json.loads(out.read_text())
    direct = bits_per_byte(model, tokenizer, stories[600:604])
    assert written["documents"] == 4 and written["tokens"] == direct["tokens"]
    assert written["bits_per_byte"] == pytest.approx(direct["bits_per_byte"], rel=1e-5)


def test_cli_subprocess_end_to_end(saved_model, tmp_path):
    folder, validation = saved_model
    out = tmp_path / "bpb.json"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    completed = subprocess.run(
        [sys.executable, "-m", "trm_lm.evaluate", "--model", str(folder), "--validation_file", str(validation),
         "--context_length", "64", "--device", "cpu", "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["documents"] == 10 and result["context_length"] == 64
    assert 0 < result["bits_per_byte"] < math.log2(512)  # at most log2(V) bits per token, tokens < bytes
    assert json.loads(completed.stdout)["bits_per_byte"] == result["bits_per_byte"]
    # progress on stderr while it works: a bar over the tokens scored, with a rate; stdout stays pure JSON
    assert "scoring: 100%" in completed.stderr and "tok/s" in completed.stderr


def test_the_evaluate_metric_module_loads_offline_and_gives_the_score(model, tokenizer, stories, monkeypatch):
    import evaluate

    from trm_lm.metrics import BITS_PER_BYTE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    documents = [stories[330], stories[331][:200], "Hi."]
    result = bits_per_byte(model, tokenizer, documents, batch_size=2)
    metric = evaluate.load(BITS_PER_BYTE)
    # one row per document, from scoring each alone: the module's sums give the batched score
    for document in documents:
        alone = bits_per_byte(model, tokenizer, [document])
        metric.add(nll_nats=alone["nll_nats"], num_bytes=alone["bytes"], num_tokens=alone["tokens"])
    combined = metric.compute()
    assert combined["documents"] == 3 and combined["tokens"] == result["tokens"] and combined["bytes"] == result["bytes"]
    assert combined["bits_per_byte"] == pytest.approx(result["bits_per_byte"], rel=1e-5)
    with pytest.raises(ValueError, match="at least one document"):
        evaluate.load(BITS_PER_BYTE).compute(nll_nats=[], num_bytes=[], num_tokens=[])
    with pytest.raises(ValueError, match="num_bytes and num_tokens must be > 0"):
        evaluate.load(BITS_PER_BYTE).compute(nll_nats=[1.0], num_bytes=[0], num_tokens=[1])

"""Bits per byte (and perplexity) of any causal LM on whole documents.

    python -m trm_lm.evaluate --model out/trm --validation_file ../shared/data/tinystories/valid.jsonl \
        [--max_documents N] [--context_length L] [--batch_size B] [--device cpu] [--trust_remote_code] \
        [--forward_kwargs '{"halt_threshold": 0.9}'] [--json result.json]

TRM_LM_SMOKE=1 in the environment scores only the first 2 documents (a smoke run, said so on stderr).

Protocol (shared/reference/trm-language.md §3.5), the same for every model and tokenizer:
  * every document is scored on its own: the input is BOS + document tokens (the tokenizer's BOS, its EOS
    when it has none) and the targets are the document tokens + EOS, so every token of the document and
    the final EOS are predicted;
  * bytes = UTF-8 bytes of the document + 1 for the EOS (it stands for the separator between documents);
  * NLL is summed in nats over all predicted tokens; bits_per_byte = nll / (ln 2 * bytes) and
    perplexity = exp(nll / tokens) (tokenizer-dependent, only comparable with the same tokenizer);
  * a document longer than the context (default: `config.max_position_embeddings`) is scored with a
    sliding window of `context_length` input tokens moved by stride = context_length // 2; each window
    scores only the targets no earlier window scored, so every token is scored exactly once, after at
    least context_length - stride tokens of context (all of it in the first window); the last window
    is aligned to the end of the document to give its targets as much context as possible.
The logits come from the model's plain forward `model(input_ids, attention_mask=...).logits`, i.e. the
path generation uses; `forward_kwargs` (e.g. `{"halt_threshold": 0.9}` for TRM) are passed through.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import evaluate
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trm_lm.core import IGNORE_INDEX
from trm_lm.data import load_or_train_tokenizer, read_documents
from trm_lm.metrics import BITS_PER_BYTE
from trm_lm.arguments import apply_smoke_limits, smoke_run

SMOKE_MAX_DOCUMENTS = 2  # TRM_LM_SMOKE=1: the CLI only checks that it works


def sliding_windows(num_targets: int, context_length: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence `ids` of num_targets + 1 tokens (BOS ... EOS) for a model that sees at most
    `context_length` tokens: (begin, end, first_scored) means inputs ids[begin:end] predict ids[begin+1:end+1],
    and only targets of input positions >= first_scored are scored. Together they score each target once.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")
    stride = context_length // 2
    end = min(context_length, num_targets)
    windows = [(0, end, 0)]
    while end < num_targets:
        new_end = min(end + stride, num_targets)
        windows.append((new_end - context_length, new_end, end))
        end = new_end
    return windows


def _scoring_rows(token_ids: list[int], context_length: int | None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) rows for one document given as BOS + tokens + EOS; labels are already shifted."""
    num_targets = len(token_ids) - 1
    rows = []
    for begin, end, first_scored in sliding_windows(num_targets, context_length or num_targets + 1):
        inputs = token_ids[begin:end]
        labels = [token_ids[i + 1] if i >= first_scored else IGNORE_INDEX for i in range(begin, end)]
        rows.append((inputs, labels))
    return rows


@torch.no_grad()
def bits_per_byte(
    model,
    tokenizer,
    documents: Sequence[str],
    context_length: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    forward_kwargs: dict | None = None,
    progress: bool = False,
) -> dict:
    """Score `documents` with the protocol of the module docstring and return
    {bits_per_byte, nll_nats, tokens, bytes, perplexity, loss_per_token, documents, context_length}.

    Rows of similar length are batched together with right padding + attention_mask, and padded targets
    are ignored, so the result does not depend on `batch_size`. If `device` is given the model is moved
    there; otherwise the model's own device is used. `forward_kwargs` go to every forward call (with
    `use_cache=False` unless overridden). `progress`: a tqdm bar over the tokens scored, with a rate.
    """
    if not documents:
        raise ValueError("no documents to evaluate")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token, which the protocol predicts after every document")
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if context_length is None:
        context_length = getattr(model.config, "max_position_embeddings", None)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    forward_kwargs = {"use_cache": False, **(forward_kwargs or {})}

    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    rows = [(doc, inputs, targets) for doc, ids in enumerate(encoded)
            for inputs, targets in _scoring_rows([bos_id] + ids + [tokenizer.eos_token_id], context_length)]
    rows.sort(key=lambda row: len(row[1]), reverse=True)  # similar lengths together; largest batch first

    was_training = model.training
    model.eval()
    document_nats = [0.0] * len(documents)
    scored = lambda batch: sum(t != IGNORE_INDEX for _, _, targets in batch for t in targets)  # noqa: E731
    bar = tqdm(total=scored(rows), unit="tok", unit_scale=True, desc="scoring",
               disable=not progress, dynamic_ncols=True)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = len(batch[0][1])
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (_, inputs, targets) in enumerate(batch):
            input_ids[i, : len(inputs)] = torch.tensor(inputs)
            labels[i, : len(targets)] = torch.tensor(targets)
            attention_mask[i, : len(inputs)] = 1
        logits = model(input_ids.to(device), attention_mask=attention_mask.to(device), **forward_kwargs).logits
        logits = logits.float()  # (B, T, V), summed in fp32 whatever the model's dtype
        labels = labels.to(device)
        row_nats = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                   reduction="none").sum(-1)  # (B,) nats per row
        for (doc, _, _), nats in zip(batch, row_nats.tolist()):
            document_nats[doc] += nats
        bar.update(scored(batch))
    bar.close()
    model.train(was_training)

    # The aggregation is the `evaluate` metric module shipped in trm_lm/metrics (loaded offline from its path):
    # one row per document, so the same numbers come out of `evaluate` for anyone who scores other models.
    metric = evaluate.load(BITS_PER_BYTE)
    result = metric.compute(nll_nats=document_nats, num_bytes=[len(d.encode("utf-8")) + 1 for d in documents],
                            num_tokens=[len(ids) + 1 for ids in encoded])  # + 1: the EOS after each document
    return {
        "bits_per_byte": result["bits_per_byte"],
        "nll_nats": math.fsum(document_nats),
        "tokens": result["tokens"],
        "bytes": result["bytes"],
        "perplexity": result["perplexity"],
        "loss_per_token": result["loss_per_token"],
        "documents": result["documents"],
        "context_length": context_length,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Bits per byte of a causal LM on whole documents.",
                                     epilog="TRM_LM_SMOKE=1 in the environment: score only the first "
                                            f"{SMOKE_MAX_DOCUMENTS} documents (a smoke run, never a real score).")
    parser.add_argument("--model", required=True, help="model folder or Hub id (AutoModelForCausalLM)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: --model)")
    parser.add_argument("--validation_file", required=True, help=".txt / .jsonl / .json / .parquet documents")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--max_documents", type=int, default=None, help="score only the first N documents")
    parser.add_argument("--context_length", type=int, default=None, help="default: config.max_position_embeddings")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available)")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument(
        "--forward_kwargs", type=json.loads, default=None, help='extra forward arguments, JSON: {"halt_threshold": 0.9}'
    )
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    for name, minimum in (("max_documents", 1), ("batch_size", 1), ("context_length", 2)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be >= {minimum}, got {value}")
    if smoke_run():
        apply_smoke_limits((args,), {"max_documents": SMOKE_MAX_DOCUMENTS})
    try:
        return _score(args)
    except (OSError, ValueError) as error:  # a user error: one line, no traceback
        from .generation import one_line

        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def _score(args) -> dict:
    from .generation import load_model_and_tokenizer

    documents = read_documents(args.validation_file, args.text_column)[: args.max_documents]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # The one checked loading path of the CLIs (missing, unexpected, mis-shaped and non-finite weights are
    # errors); the weights are scored in float32 on CPU whatever the checkpoint stores.
    model, tokenizer = load_model_and_tokenizer(args.model, device=device, trust_remote_code=args.trust_remote_code)
    model = model.float()
    if args.tokenizer:
        tokenizer = load_or_train_tokenizer(args.tokenizer, trust_remote_code=args.trust_remote_code)
    print(f"scoring {len(documents):,} documents of {args.validation_file} with {args.model} on {device} ...",
          file=sys.stderr, flush=True)
    result = bits_per_byte(
        model, tokenizer, documents, context_length=args.context_length, batch_size=args.batch_size,
        device=device, forward_kwargs=args.forward_kwargs, progress=True,
    )
    if not math.isfinite(result["bits_per_byte"]):
        raise ValueError(f"the score of {args.model} is not finite ({result['bits_per_byte']}): the weights or "
                         "the forward arguments produce NaN/inf logits")
    result = {"model": args.model, "validation_file": args.validation_file, **result}
    if args.forward_kwargs:
        result["forward_kwargs"] = args.forward_kwargs
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

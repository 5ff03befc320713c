"""Bits per byte as a Hugging Face `evaluate` metric, loadable offline from this folder.

    import evaluate, trm_lm.metrics
    metric = evaluate.load(trm_lm.metrics.BITS_PER_BYTE)           # a local path: no Hub access
    metric.add_batch(nll_nats=[812.4, 95.1], num_bytes=[1043, 128], num_tokens=[270, 33])
    metric.compute()   # {"bits_per_byte": ..., "perplexity": ..., "documents": 2, ...}

One row per document: the summed negative log-likelihood (nats) of its tokens, its UTF-8 bytes and its
token count. Bits per byte = total nats / (ln 2 * total bytes): unlike per-token loss or perplexity it
does not depend on the tokenizer, so models with different vocabularies are compared on the same text
(trm_lm.evaluate produces these rows, one per validation document).
"""

import math

import datasets
import evaluate

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    nll_nats: per document, the summed negative log-likelihood of its tokens in nats (>= 0; NaN/inf pass through).
    num_bytes: per document, its length in UTF-8 bytes (the protocol counts the end-of-document marker as 1).
    num_tokens: per document, the number of tokens scored.
Returns:
    bits_per_byte, loss_per_token (nats), perplexity, documents, bytes, tokens.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BitsPerByte(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll_nats": datasets.Value("float64"), "num_bytes": datasets.Value("int64"),
                                        "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll_nats, num_bytes, num_tokens):
        if not nll_nats:
            raise ValueError("bits_per_byte needs at least one document")
        if any(n < 0 for n in nll_nats):  # NaN/inf pass through: the caller says which model made them
            raise ValueError("nll_nats must be >= 0 for every document")
        if any(b <= 0 for b in num_bytes) or any(t <= 0 for t in num_tokens):
            raise ValueError("num_bytes and num_tokens must be > 0 for every document")
        nats, total_bytes, tokens = math.fsum(nll_nats), sum(num_bytes), sum(num_tokens)
        return {"bits_per_byte": nats / (math.log(2) * total_bytes), "loss_per_token": nats / tokens,
                "perplexity": math.exp(nats / tokens), "documents": len(nll_nats), "bytes": total_bytes,
                "tokens": tokens}

"""Many users, one model: the app's batched decoder.

    decoder = BatchedDecoder(model, tokenizer)               # starts one decoding thread
    stream = decoder.submit("Once upon a time", settings)    # bad input raises ValueError here
    result = yield from stream                               # text pieces as they come, then a GenerationResult
    decoder.close()

`submit` returns the same kind of generator as `generation.stream_generate`, but the requests of all users
are decoded together: the thread takes every request waiting (up to `max_batch_size`, after a short
`gather_seconds` for latecomers), left-pads their prompts into one batch with one KV cache, and runs one
forward pass per new token for the whole batch. A forward pass of a tiny model costs nearly the same
for 16 rows as for one, so throughput grows with the number of users while each one's latency barely
does (benchmarks/app_load.py). Rows leave the batch as they finish (EOS, max_new_tokens, or the reader
went away); requests that arrive meanwhile join it between two forward passes (continuous batching): their
prompts are run through the model in their own cache, which is then left-padded and concatenated to the
batch's, so a user never waits for strangers' stories to end.

Same tokens as `generate()`: each row goes through the logits processors `generation.generate_kwargs`
makes for its settings, whose last one samples with the request's own torch.Generator, so a seeded
request gives the same text alone, in a batch of strangers, and from `generate_text` with that seed
(tests/trm_lm/test_serving.py). A
forward pass takes one value of each TRM control, so requests with different supervision steps or halt
thresholds are decoded in separate batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessorList, TextIteratorStreamer

from .generation import (
    DECODE_KWARGS,
    EncodedPrompt,
    GenerationResult,
    GenerationSettings,
    SampleWithGenerator,
    _result,
    check_trace_top_k,
    generate_kwargs,
    padding_id,
    prepare_prompt,
)
from .modeling_trm import CACHE_FIELD, TokenTrace

_CLOSE = object()  # queue sentinel
logger = logging.getLogger(__name__)


def left_pad(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask of 1-D id tensors, padded on the left so every row ends in the last column."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        ids[i, width - len(sequence):] = sequence
        mask[i, width - len(sequence):] = 1
    return ids, mask


@dataclass(eq=False)
class _Request:
    encoded: EncodedPrompt
    settings: GenerationSettings
    controls: dict  # the TRM keywords of the forward pass (halt_threshold, supervision_steps)
    streamer: TextIteratorStreamer
    processors: LogitsProcessorList  # generate_kwargs': penalty, warpers, then the draw with this request's generator
    trace_top_k: int = 0  # > 0: also trace what the recursion did for each token (as model.inspect)
    token_ids: list[int] = field(default_factory=list)
    traces: list[TokenTrace] | None = None
    reader_gone: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def batch_key(self) -> tuple:
        return tuple(sorted(self.controls.items()))

    @property
    def sampling_key(self) -> tuple | None:
        """Rows with the same key share every processor but the draw (None: a penalty reads this row's history)."""
        s = self.settings
        return None if s.repetition_penalty != 1.0 else (s.temperature, s.top_k, s.top_p)

    @property
    def draw(self) -> SampleWithGenerator | None:
        """The processor that samples this row's token (last in `processors`); None when greedy."""
        last = self.processors[-1] if len(self.processors) else None
        return last if isinstance(last, SampleWithGenerator) else None

    def next_token(self, logits: torch.Tensor) -> int:
        """Pick this row's next token from its (1, V) float32 logits, as generate() does."""
        history = torch.cat([self.encoded.input_ids[0], torch.tensor(self.token_ids, dtype=torch.long)])
        scores = self.processors(history.unsqueeze(0).to(logits.device), logits)
        return int(scores.argmax(dim=-1))  # when sampling, the drawn token is the only finite score

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.streamer.end()
        self.finished.set()


def next_tokens(rows: list[_Request], logits: torch.Tensor) -> list[int]:
    """Every row's next token from the batch's (B, V) float32 logits, each exactly as `row.next_token` picks it.

    Temperature, top-k and top-p treat rows independently, so rows with the same settings are warped together
    (one sort of their logits instead of one per row); only the draw, with each row's own generator, is per
    row. Rows with a repetition penalty (which reads the row's own history) go one by one."""
    tokens: list[int | None] = [None] * len(rows)
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        if row.sampling_key is None:
            tokens[i] = row.next_token(logits[i:i + 1])
        else:
            groups.setdefault(row.sampling_key, []).append(i)
    for members in groups.values():
        first = rows[members[0]]
        shared = first.processors[:-1] if first.draw is not None else first.processors  # no penalty in a group
        scores = logits[members]
        for warp in shared:
            scores = warp(None, scores)
        for j, i in enumerate(members):
            row_scores = scores[j:j + 1] if rows[i].draw is None else rows[i].draw(None, scores[j:j + 1])
            tokens[i] = int(row_scores.argmax(dim=-1))
    return tokens


class BatchedDecoder:
    """One decoding thread serving every caller of `submit`; see the module docstring."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, gather_seconds: float = 0.02):
        if max_batch_size < 1 or gather_seconds < 0:
            raise ValueError(f"max_batch_size must be >= 1 and gather_seconds >= 0, got {max_batch_size} "
                             f"and {gather_seconds}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.gather_seconds = max_batch_size, gather_seconds
        self.pad_token_id = padding_id(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.batch_sizes: list[int] = []  # every batch decoded so far, for benchmarks and tests
        self.joined = 0  # requests that joined a batch already decoding
        self._queue: queue.Queue = queue.Queue()
        self._set_aside: list[_Request] = []  # taken from the queue, waiting for a batch with their controls
        self._in_flight: list[_Request] = []  # being decoded: the ones an error in decoding must reach
        self._closed = self._closing = False
        # held while a request is queued and while the ending thread fails what is queued, so that no request
        # can be queued after that final sweep (its reader would wait forever)
        self._queue_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="trm-lm-batched-decoder", daemon=True)
        self._thread.start()

    # ----- callers -------------------------------------------------------------------------------------
    def submit(self, prompt: str | bytes | EncodedPrompt, settings: GenerationSettings,
               trace_top_k: int = 0) -> Generator[str, None, GenerationResult]:
        """Queue one generation; returns a generator of its text that returns a GenerationResult.

        Everything is checked before this returns. With `trace_top_k=k` (TRM) the result carries
        `model.inspect`'s per-token traces, taken from the decoding's own forward passes.
        Closing the generator early drops the row from its batch.
        """
        if self._closed:
            raise RuntimeError("this BatchedDecoder is closed")
        if settings.num_return_sequences != 1:
            raise ValueError("streaming shows one sequence: use num_return_sequences=1")
        if trace_top_k:
            check_trace_top_k(self.model, trace_top_k)
        encoded = prepare_prompt(self.model, self.tokenizer, prompt, settings)
        kwargs = generate_kwargs(self.model, self.tokenizer, settings)  # checks the TRM controls
        controls = {name: kwargs[name] for name in ("halt_threshold", "supervision_steps", "share_step_cache")
                    if name in kwargs}
        request = _Request(encoded=encoded, settings=settings, controls=controls,
                           streamer=TextIteratorStreamer(self.tokenizer, skip_prompt=False, **DECODE_KWARGS),
                           processors=kwargs["logits_processor"], trace_top_k=trace_top_k)
        with self._queue_lock:
            if self._closed:
                raise RuntimeError("this BatchedDecoder is closed")
            self._queue.put(request)
        return self._follow(request)

    def _follow(self, request: _Request):
        try:
            for piece in request.streamer:
                if piece:
                    yield piece
        finally:  # also when the reader closes us early
            request.reader_gone.set()
        request.finished.wait()
        if request.error is not None:
            raise request.error
        # decoded here, in the reader's thread: the decoding thread serves everyone
        traces = None if request.traces is None else [trace.decoded(self.tokenizer) for trace in request.traces]
        return _result(self.tokenizer, request.encoded, [request.token_ids], traces)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the thread after the batch in progress (it takes no newcomers once it has seen the close);
        requests still waiting end with an error."""
        with self._queue_lock:
            self._closed = True
            self._queue.put(_CLOSE)
        self._thread.join(timeout)

    # ----- the decoding thread -------------------------------------------------------------------------
    def _take(self, key: tuple | None, limit: int, wait: float) -> list[_Request]:
        """Up to `limit` requests with batch key `key` (None: any key, the first one's), from those set aside
        and then from the queue, waiting at most `wait` seconds for more; the others are set aside in order."""
        taken, kept = [], []
        for request in self._set_aside:
            if len(taken) < limit and (key is None or request.batch_key == key):
                key = request.batch_key
                taken.append(request)
            else:
                kept.append(request)
        self._set_aside = kept
        deadline = time.monotonic() + wait
        while len(taken) < limit and not self._closing:
            try:
                request = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request is _CLOSE:
                self._closing = True
            elif key is None or request.batch_key == key:
                key = request.batch_key
                taken.append(request)
            else:
                self._set_aside.append(request)
        return taken

    def _serve(self) -> None:
        ending = RuntimeError("the decoder was closed before this request ran")
        try:
            while not self._closing:
                if not self._set_aside:  # sleep until someone submits
                    first = self._queue.get()
                    if first is _CLOSE:
                        break
                    self._set_aside.append(first)
                rows = self._take(None, self.max_batch_size, self.gather_seconds)
                try:
                    self._decode(rows)
                except BaseException as error:  # handed to every reader of the batch, who re-raises it
                    for request in self._in_flight:
                        if not request.finished.is_set():
                            request.finish(error)
                self._in_flight = []
        except BaseException as error:  # a bug outside a batch: the thread ends, and says why to every reader
            ending = RuntimeError(f"the decoder stopped: {type(error).__name__}: {error}")
            logger.error("%s", ending, exc_info=error)
        finally:  # nobody waits forever: fail what is in flight or still waiting
            waiting = self._in_flight + self._set_aside
            with self._queue_lock:
                self._closed = True
                while True:
                    try:
                        waiting.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
            for request in waiting:
                if request is not _CLOSE and not request.finished.is_set():
                    request.finish(ending)

    @torch.no_grad()
    def _decode(self, rows: list[_Request]) -> None:
        """Decode `rows` together until each has finished: one forward pass per new token for all of them.
        Requests with the same controls that arrive meanwhile join the batch between two forward passes
        (continuous batching), so nobody waits for a whole batch to finish."""
        key = rows[0].batch_key
        batch = self._prefill(rows)
        while batch is not None:
            room = self.max_batch_size - len(batch.rows)
            newcomers = self._take(key, room, 0.0) if room > 0 else []
            if newcomers:
                self.joined += len(newcomers)
                joined = self._prefill(newcomers)
                if joined is not None:
                    batch = batch.merge(joined)
            batch = self._step(batch)

    def _prefill(self, rows: list[_Request]) -> _Batch | None:
        """The prompts of `rows` through the model in one left-padded batch with a new cache; their first tokens
        sampled. Returns the rows still going, ready for the next step (None when all finished)."""
        device = self.model.device
        self.batch_sizes.append(len(rows))
        self._in_flight.extend(rows)
        for row in rows:
            row.traces = [] if row.trace_top_k else None
        # left padding: every row's next token is read from the last column
        input_ids, attention_mask = left_pad([row.encoded.input_ids[0] for row in rows], self.pad_token_id)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its own first token
        batch = _Batch(rows, DynamicCache(config=self.model.config), attention_mask.to(device),
                       position_ids[:, -1].to(device), input_ids.to(device))
        return self._step(batch, position_ids.to(device))

    def _step(self, batch: _Batch, position_ids: torch.Tensor | None = None) -> _Batch | None:
        """One forward pass for every row of `batch` (its pending input column, or the prompts at prefill with
        `position_ids`), one sampled token per row, finished rows dropped."""
        rows = batch.rows
        if position_ids is None:
            position_ids = batch.last_position.unsqueeze(1)
        # The depth view's traces come from the decoding itself: each step's top-k for the next token.
        trace_top_k = max(row.trace_top_k for row in rows)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, output_step_topk=trace_top_k,
                         **{CACHE_FIELD: batch.cache}, **rows[0].controls)
        logits = out.logits[:, -1].to(dtype=torch.float32)  # (B, V)
        keep, next_ids, done = [], [], []
        for i, (row, token) in enumerate(zip(rows, next_tokens(rows, logits))):
            if row.trace_top_k:  # the last column predicted it; positions count the row's own tokens
                position = row.encoded.input_ids.shape[1] + len(row.token_ids)
                row.traces.append(TokenTrace.from_output(out, i, -1, token, position, top_k=row.trace_top_k))
            row.token_ids.append(token)
            row.streamer.put(torch.tensor([token]))
            if token == self.eos_token_id or len(row.token_ids) >= row.settings.max_new_tokens \
                    or row.reader_gone.is_set():
                done.append(row)
            else:
                keep.append(i)
                next_ids.append(token)
        for row in done:
            row.finish()
            self._in_flight.remove(row)
        if not keep:
            return None
        if len(keep) < len(rows):  # finished rows leave the batch and the cache
            batch = batch.select(keep)
        batch.input_ids = torch.tensor(next_ids, dtype=torch.long, device=batch.input_ids.device).unsqueeze(1)
        batch.last_position = batch.last_position + 1
        batch.attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones((len(keep), 1))], 1)
        return batch


@dataclass(eq=False)
class _Batch:
    """Rows decoded together, between two forward passes: the cache holds every column of `attention_mask`
    but the last, `input_ids` (B, 1) is that last column (the prompts at prefill), `last_position` (B,) its
    position per row."""

    rows: list[_Request]
    cache: DynamicCache
    attention_mask: torch.Tensor  # (B, K + 1), 0 = left padding
    last_position: torch.Tensor  # (B,)
    input_ids: torch.Tensor  # (B, 1)

    def select(self, keep: list[int]) -> _Batch:
        index = torch.tensor(keep, device=self.attention_mask.device)
        self.cache.batch_select_indices(index)
        return _Batch([self.rows[i] for i in keep], self.cache, self.attention_mask[index],
                      self.last_position[index], self.input_ids[index])

    def merge(self, other: _Batch) -> _Batch:
        """One batch of both: the shorter history is left-padded (zero K/V under a 0 mask, exactly what a
        left-padded prompt is), every cache slot concatenated along the batch."""
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])
        if len(self.cache.layers) != len(other.cache.layers):
            raise RuntimeError(f"cannot merge caches with {len(self.cache.layers)} and {len(other.cache.layers)} "
                               "slots (the same controls fill the same slots)")
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)  # (B, H, K, D)
                setattr(mine, name, torch.cat([_left_pad_columns(a, width - 1, dim=2),
                                               _left_pad_columns(b, width - 1, dim=2)], dim=0))
        mask = torch.cat([_left_pad_columns(self.attention_mask, width, dim=1),
                          _left_pad_columns(other.attention_mask, width, dim=1)], dim=0)
        return _Batch(self.rows + other.rows, self.cache, mask, torch.cat([self.last_position, other.last_position]),
                      torch.cat([self.input_ids, other.input_ids]))


def _left_pad_columns(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros prepended along `dim` up to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


__all__ = ["BatchedDecoder", "left_pad"]

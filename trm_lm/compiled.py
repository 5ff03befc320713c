"""Compiled decoding: a preallocated StaticCache and one torch.compile'd decoding step.

    decoder = CompiledDecoder(model)                       # compiles on its first generate() (10-20 s on CPU)
    sequences = decoder.generate(input_ids, max_new_tokens=200)       # greedy; same tokens as model.generate
    settings = GenerationSettings(max_new_tokens=200, compile=True)   # or through trm_lm.generation / --compile

Why it pays on a small model: one decoded token of the shipped model is 16 block applications of a
256-wide network, ~500 small tensor operations whose dispatch costs more than their arithmetic. The
compiled step runs them as a few fused kernels, on a cache whose shape never changes (so it compiles once
per batch size and supervision-step count, not once per length), with attention over the cache computed
by the fused math kernel instead of the flash kernel, whose per-call set-up dominates for one query on CPU.
The prefill runs eagerly on the same cache.

What it computes: exactly the eager model's function (same cache slots, masks and positions); the fused
kernels round differently at the 1e-6 level, so logits match the dynamic-cache decoding to that level and
the tokens in our tests are the same (tests/trm_lm/test_compiled.py). Sampling uses the same logits
processors as trm_lm.generation (each generation's own torch.Generator), in generate()'s order.

What it does not do: per-token early exit (ACT: whether a token stops is data-dependent, so the step would
not be one graph) and `share_step_cache` (its in-place overwrite indexes the cache by the current length):
both are refused with a message. It keeps the whole context in the cache, so it needs
prompt + new tokens <= `max_length` (default: the model's max_position_embeddings).
"""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationConfig, LogitsProcessorList, StaticCache, StoppingCriteriaList

from .modeling_trm import CACHE_FIELD, resolve_halt_threshold

logger = logging.getLogger(__name__)


def check_compilable(model, halt_threshold=None, share_step_cache: bool = False) -> None:
    """Refuse, with the reason, the TRM controls a compiled step cannot run (both are data-dependent)."""
    if resolve_halt_threshold(halt_threshold, model.config, training=False) is not None:
        raise ValueError("compile runs every supervision step: per-token early exit (halt_threshold) is "
                         "data-dependent and cannot be one compiled graph; pass halt_threshold=0 or decode without "
                         "compiling")
    if share_step_cache:
        raise ValueError("compile runs every supervision step with one cache slot per virtual layer: "
                         "share_step_cache needs the uncompiled decoding")


class CompiledDecoder:
    """Decodes a TRMForCausalLM with one compiled step on a preallocated StaticCache; see the module docstring.

    max_length: cache positions (prompt + new tokens); one cache and one compiled graph per batch size and
    number of supervision steps, reused by every call. mode: torch.compile's mode (None: its default).
    """

    def __init__(self, model, max_length: int | None = None, mode: str | None = None):
        if getattr(model.config, "model_type", None) != "trm_lm":
            raise ValueError(f"CompiledDecoder decodes TRM models; this one is {model.config.model_type!r}")
        limit = model.config.max_position_embeddings
        max_length = limit if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= limit:
            raise ValueError(f"max_length must be an integer in [2, max_position_embeddings={limit}], "
                             f"got {max_length!r}")
        self.model, self.max_length = model, max_length
        self._lock = threading.Lock()  # the caches are shared state: one generation at a time
        self._caches: dict[tuple, StaticCache] = {}  # (batch size, steps, device, dtype) -> its cache
        # freezing: the weights are constants of the graph (inductor folds and prepacks them: ~1.2x on CPU);
        # `_compiled_weights` notices when they change and has everything recompiled rather than decode with old ones
        self._step = torch.compile(self._eager_step, fullgraph=True, dynamic=False, mode=mode,
                                   options={"freezing": True})
        self._compiled_weights = None

    def _weights(self) -> tuple:
        """What identifies the weights' values: storage, in-place version and sum of every parameter and buffer
        (the sum catches writes through `.data`, which the version counter does not see)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        sums = torch.stack([t.detach().double().sum() for t in tensors]).tolist()
        return tuple((t.data_ptr(), t._version) for t in tensors), sums

    def _check_weights(self) -> None:
        weights = self._weights()
        if self._compiled_weights is not None and weights != self._compiled_weights:
            logger.info("the model's weights changed since they were compiled in: recompiling")
            torch._dynamo.reset()  # the frozen graphs hold the old weights; the next step compiles anew
        self._compiled_weights = weights

    def _cache(self, batch_size: int, steps: int) -> StaticCache:
        # the device and dtype too: a cache takes them from its first keys, and the model may move or be cast
        key = (batch_size, steps, self.model.device, self.model.dtype)
        if key not in self._caches:
            config = self.model.config
            # one slot per virtual layer (num_hidden_layers, derived from the steps): test-time depth gets its own
            slots = type(config).from_dict({**config.to_dict(), "supervision_steps": steps})
            self._caches[key] = StaticCache(config=slots, max_cache_len=self.max_length)
        cache = self._caches[key]
        cache.reset()
        return cache

    def _eager_step(self, input_ids, position_ids, attention_mask, cache, steps):
        # on CPU the math kernel, fused by inductor: the flash kernel's set-up dominates for one query
        with sdpa_kernel(SDPBackend.MATH) if input_ids.device.type == "cpu" else nullcontext():
            out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                             use_cache=True, logits_to_keep=1, halt_threshold=0, supervision_steps=steps,
                             **{CACHE_FIELD: cache})
        return out.logits[:, -1].float()  # (B, V)

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                 generation_config: GenerationConfig | None = None, logits_processor=None,
                 stopping_criteria=None, streamer=None, max_new_tokens: int | None = None,
                 halt_threshold=None, supervision_steps: int | None = None, share_step_cache: bool = False,
                 pad_token_id: int | None = None) -> torch.LongTensor:
        """(B, T) prompt ids (left-padded, `attention_mask` marking real tokens) -> (B, T + new) as
        `model.generate` returns them: rows that hit EOS are padded with the pad id after it, and decoding
        stops when every row has finished, after `max_new_tokens`, or when `stopping_criteria` say so.
        Greedy unless `logits_processor` draws (trm_lm.generation's processors do when sampling)."""
        with self._lock:
            return self._generate(input_ids, attention_mask, generation_config, logits_processor, stopping_criteria,
                                  streamer, max_new_tokens, halt_threshold, supervision_steps, share_step_cache,
                                  pad_token_id)

    def _generate(self, input_ids, attention_mask, generation_config, logits_processor, stopping_criteria, streamer,
                  max_new_tokens, halt_threshold, supervision_steps, share_step_cache, pad_token_id):
        model = self.model
        config = generation_config or GenerationConfig()
        new_tokens = max_new_tokens if max_new_tokens is not None else config.max_new_tokens
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {new_tokens!r}")
        check_compilable(model, halt_threshold, share_step_cache)
        if model.training:
            raise ValueError("compiled decoding is for inference: call model.eval() first")
        steps = model.config.supervision_steps if supervision_steps is None else supervision_steps
        B, T = input_ids.shape
        if T < 1 or T + new_tokens > self.max_length:
            raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({new_tokens}) must fit the compiled cache of "
                             f"{self.max_length} positions")
        device = model.device
        input_ids = input_ids.to(device)
        prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        eos = config.eos_token_id if config.eos_token_id is not None else model.generation_config.eos_token_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=device)
        pad = pad_token_id if pad_token_id is not None else config.pad_token_id
        if pad is None:
            pad = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None \
                else (int(eos_ids[0]) if len(eos_ids) else 0)
        processors = logits_processor if logits_processor is not None else LogitsProcessorList()
        stopping = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()

        # The mask covers the whole cache from the start: positions not yet written are hidden by causality.
        mask = torch.cat([prompt_mask, prompt_mask.new_ones((B, self.max_length - T))], dim=1)  # (B, L)
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row counts from its first token
        self._check_weights()
        cache = self._cache(B, steps)
        logits = self._eager_step(input_ids, positions, mask, cache, steps)  # prefill, eagerly
        last_position = positions[:, -1:]  # (B, 1)
        sequences = input_ids
        unfinished = torch.ones(B, dtype=torch.bool, device=device)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        for index in range(new_tokens):
            scores = processors(sequences, logits)
            next_ids = scores.argmax(dim=-1)  # the drawn token is the only finite score when sampling
            next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad))
            sequences = torch.cat([sequences, next_ids[:, None]], dim=1)
            if streamer is not None:
                streamer.put(next_ids.cpu())
            unfinished &= ~torch.isin(next_ids, eos_ids)
            if len(stopping):
                unfinished &= ~stopping(sequences, scores)
            if not bool(unfinished.any()) or index == new_tokens - 1:
                break
            last_position = last_position + 1
            logits = self._step(next_ids[:, None], last_position, mask, cache, steps)
        if streamer is not None:
            streamer.end()
        return sequences


_DECODER_LOCK = threading.Lock()


def compiled_decoder(model) -> CompiledDecoder:
    """`model`'s CompiledDecoder, made on first use and kept on the model (so it lives and dies with it), so that
    every generation with compile=True (generate_text, stream_generate, --compile) reuses its compiled graphs."""
    with _DECODER_LOCK:
        decoder = model.__dict__.get("_trm_compiled_decoder")
        if decoder is None:
            decoder = model.__dict__["_trm_compiled_decoder"] = CompiledDecoder(model)
        return decoder


__all__ = ["CompiledDecoder", "compiled_decoder", "check_compilable"]

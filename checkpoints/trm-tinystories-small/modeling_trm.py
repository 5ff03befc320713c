"""TRMForCausalLM: a Tiny Recursive Model as a Hugging Face causal language model.

Per token, as in the paper: x = the token's embedding, y (answer) and z (latent) start from fixed
vectors; every supervision step runs the core recursion (trm_lm/core.py) and the LM head reads y.
All attention is causal, so position t only ever sees tokens <= t at every virtual layer.

Training (labels given): all `supervision_steps` run; the carry (y, z) is detached between steps;
loss = mean over steps of [token cross-entropy + halt_loss_weight * per-token halting BCE], the halt
target being "this position's argmax is already the next token". The logits returned are those of
the final step, i.e. exactly what generation uses.

Inference: `halt_threshold` (argument or config) turns on per-token exit: after each step, positions
whose P(halt) >= threshold freeze (see core.py for the KV copy-forward). `halt_criterion="entropy"|"kl"`
swaps the trained head for a training-free rule (next-token entropy, or KL between successive steps).
`generate()` works with the stock DynamicCache, one slot per virtual layer (config.num_hidden_layers of them).

Relative imports only: this file and its siblings are copied next to saved weights as remote code.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_trm import TRMConfig
from .core import TRMCore, init_trm_weights

_FROM_CONFIG = "config"  # halt_threshold default: use config.halt_threshold


@dataclass
class TRMCausalLMOutputWithPast(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus what the recursion did.

    steps_used: (B, T) supervision steps each position actually ran (all of them unless ACT halted it).
    step_losses: (S,) detached per-step total loss, training diagnostics.
    step_top_ids / step_top_probs: (S, B, T', k) top-k next-token predictions after every step, when
        `output_step_topk=k` was asked for (T' = positions kept by `logits_to_keep`).
    """

    steps_used: torch.LongTensor | None = None
    step_losses: torch.FloatTensor | None = None
    step_top_ids: torch.LongTensor | None = None
    step_top_probs: torch.FloatTensor | None = None


class TRMPreTrainedModel(PreTrainedModel):
    config_class = TRMConfig
    base_model_prefix = "model"
    _no_split_modules = ["TRMBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module):
        init_trm_weights(module, self.config.initializer_range)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Safetensors only: pickle checkpoints can run arbitrary code when loaded, so they are refused."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("trm-lm loads safetensors checkpoints only (use_safetensors=False is not supported)")
        kwargs["use_safetensors"] = True
        where = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(where):
            files = os.listdir(where)
            pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
            if pickles and not any(f.endswith(".safetensors") for f in files):
                raise ValueError(f"{where} holds only pickle checkpoint(s) {pickles}; trm-lm loads safetensors only "
                                 "(pickle can execute code). Convert with model.save_pretrained() in a trusted "
                                 "environment.")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise ValueError(f"{where}: the safetensors checkpoint is corrupt or truncated ({error})") from error


def halt_rule(criterion, threshold, lm_head=None):
    """The per-token stopping rule for `threshold` under `criterion` (None = run every step).

    Returns None or rule(y, halt_logits) -> (B, T) bool. "entropy" and "kl" read next-token distributions,
    so they need the model's `lm_head`.
    """
    if criterion not in ("head", "entropy", "kl"):
        raise ValueError(f"halt_criterion must be 'head', 'entropy' or 'kl', got {criterion!r}")
    if threshold is None:
        return None
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"halt_threshold must be a number or None, got {threshold!r}") from None
    if criterion == "head":
        if not threshold > 0:  # also catches NaN
            raise ValueError(f"halt_threshold must be > 0 (values > 1 disable halting), got {threshold!r}")
        return None if threshold > 1 else (lambda y, logits: torch.sigmoid(logits) >= threshold)
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"halt_threshold for halt_criterion={criterion!r} is in nats and must be finite and "
                         f">= 0, got {threshold!r}")
    if lm_head is None:
        raise ValueError(f"halt_criterion={criterion!r} reads next-token predictions: it needs the LM head")
    previous = {}

    def rule(y, halt_logits):
        log_probs = torch.log_softmax(lm_head(y).float(), dim=-1)  # (B, T, V)
        if criterion == "entropy":
            return -(log_probs.exp() * log_probs).sum(-1) <= threshold
        before, previous["log_probs"] = previous.get("log_probs"), log_probs
        if before is None:  # nothing to compare with after the first step
            return torch.zeros(log_probs.shape[:2], dtype=torch.bool, device=y.device)
        return (log_probs.exp() * (log_probs - before)).sum(-1) <= threshold

    return rule


class TRMModel(TRMPreTrainedModel):
    """Token embedding + the recursive core; `recurse` yields the answer state y after every supervision step."""

    def __init__(self, config: TRMConfig):
        super().__init__(config)
        if not config.causal or config.mixer != "attention":
            raise ValueError("a causal language model needs causal=True and mixer='attention' "
                             f"(got causal={config.causal}, mixer={config.mixer!r})")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_scale = math.sqrt(config.hidden_size)  # unit-scale x, as the official code
        if config.position_encoding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.embedding_dropout)
        self.core = TRMCore(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def recurse(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, supervision_steps=None, halt_rule=None):
        """Run the supervision steps; yield (step, y, halt_logits, steps_used) after each.

        y: (B, T, D) answer state after the step (with grad in training; the carry into the next step is
        detached). halt_logits: (B, T). steps_used: (B, T) steps run so far by each position.
        halt_rule(y, halt_logits) -> (B, T) bool: positions that stop after this step (inference only).
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        steps = cfg.supervision_steps if supervision_steps is None else int(supervision_steps)
        if not 1 <= steps <= cfg.supervision_steps:
            raise ValueError(f"supervision_steps must be in [1, {cfg.supervision_steps}] (the model's KV-cache "
                             f"slots), got {supervision_steps!r}")
        if inputs_embeds is None:
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
                raise ValueError(f"input_ids must be in [0, {cfg.vocab_size}), got values in "
                                 f"[{int(input_ids.min())}, {int(input_ids.max())}]")
            inputs_embeds = self.embed_tokens(input_ids)
        x = inputs_embeds * self.embed_scale  # (B, T, D)
        B, T, _ = x.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + T > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {past + T} exceeds max_position_embeddings="
                             f"{cfg.max_position_embeddings}; truncate the prompt (keep its end)")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).unsqueeze(0).expand(B, -1)
        if cfg.position_encoding == "learned":
            x = x + 0.707106781 * self.embed_positions(position_ids)
        x = self.embed_dropout(x)
        rotary = self.core.rotary(position_ids) if self.core.rotary is not None else None
        mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=attention_mask,
                                  past_key_values=past_key_values, position_ids=position_ids)

        y, z = self.core.initial_state(B, T, x.dtype)
        halted = None  # (B, T) bool once ACT froze something
        steps_used = torch.zeros(B, T, dtype=torch.long, device=x.device)
        for step in range(steps):
            steps_used += 1 if halted is None else (~halted).long()
            y, z = self.core.supervision_step(x, y, z, step, rotary=rotary, attention_mask=mask,
                                              past_key_values=past_key_values, frozen=halted)
            halt_logits = self.core.halt_logits(y)
            yield step, y, halt_logits, steps_used
            y, z = y.detach(), z.detach()  # deep supervision: the carry holds no graph
            if halt_rule is not None and step < steps - 1:
                now = halt_rule(y, halt_logits)
                halted = now if halted is None else halted | now

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, supervision_steps=None, halt_threshold=None, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        rule = halt_rule("head", halt_threshold)  # no LM head here, so only the trained halt head can stop
        if (use_cache or rule is not None) and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        y = None
        for _, y, _, _ in self.recurse(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                                       supervision_steps, rule):
            pass
        return BaseModelOutputWithPast(last_hidden_state=y, past_key_values=past_key_values if use_cache else None)


class TRMForCausalLM(TRMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TRMConfig):
        super().__init__(config)
        self.model = TRMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, supervision_steps=None,
                halt_threshold=_FROM_CONFIG, halt_criterion="head", output_step_topk=0,
                **kwargs) -> TRMCausalLMOutputWithPast:
        """Standard causal-LM forward, plus TRM controls.

        supervision_steps: run only the first k steps (inference; default all).
        halt_threshold: per-token early exit; default = config.halt_threshold; None = off.
        halt_criterion: what the threshold applies to, after each step:
            "head"    the trained halt head: stop when P(halt) >= threshold (in (0, 1]; > 1 = off);
            "entropy" training-free: stop when the next-token entropy (nats) <= threshold;
            "kl"      training-free: stop when KL(p_step || p_previous_step) (nats) <= threshold.
        output_step_topk: return the top-k next-token predictions after every step (inspection).
        """
        cfg = self.config
        threshold = cfg.halt_threshold if isinstance(halt_threshold, str) and halt_threshold == _FROM_CONFIG \
            else halt_threshold
        rule = halt_rule(halt_criterion, threshold, self.lm_head)
        if rule is not None and self.training:
            raise ValueError("halt_threshold is an inference-time setting; training runs every supervision step")
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if self.training and labels is not None:
            use_cache = False
        cache = past_key_values
        if cache is None and (use_cache or rule is not None):
            cache = DynamicCache(config=cfg)  # ACT copies K/V forward even without use_cache
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        if labels is not None and logits_to_keep:
            raise ValueError("logits_to_keep must be 0 when labels are given")

        num_items = kwargs.pop("num_items_in_batch", None)
        steps = cfg.supervision_steps if supervision_steps is None else supervision_steps
        losses, top_ids, top_probs = [], [], []
        logits = steps_used = None
        for step, y, halt_logits, steps_used in self.model.recurse(
                input_ids, attention_mask, position_ids, cache, inputs_embeds, supervision_steps, rule):
            last = step == steps - 1
            if not (last or labels is not None or output_step_topk):
                continue
            logits = self.lm_head(y[:, keep])  # (B, T', V)
            if labels is not None:
                losses.append(self._step_loss(logits, halt_logits, labels, num_items, **kwargs))
            if output_step_topk:
                probs, ids = torch.softmax(logits.float(), dim=-1).topk(output_step_topk, dim=-1)
                top_ids.append(ids)
                top_probs.append(probs)

        loss = step_losses = None
        if labels is not None:
            stacked = torch.stack(losses)
            loss, step_losses = stacked.mean(), stacked.detach()
        return TRMCausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=cache if use_cache else None, steps_used=steps_used,
            step_losses=step_losses,
            step_top_ids=torch.stack(top_ids) if top_ids else None,
            step_top_probs=torch.stack(top_probs) if top_probs else None,
        )

    def _step_loss(self, logits, halt_logits, labels, num_items, **kwargs):
        """Token CE (the library's loss: shifts labels, ignores -100, honours num_items_in_batch) + halting BCE."""
        ce = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                num_items_in_batch=num_items, **kwargs)
        if self.config.halt_loss_weight == 0:
            return ce
        targets = labels[:, 1:]  # position t predicts token t + 1
        valid = targets != -100
        with torch.no_grad():
            correct = (logits[:, :-1].argmax(-1) == targets).float()  # per token, not batch-mean
        bce = F.binary_cross_entropy_with_logits(halt_logits[:, :-1], correct, reduction="none")
        denominator = num_items if num_items is not None else valid.sum().clamp(min=1)
        halt = (bce * valid).sum() / denominator
        return ce + self.config.halt_loss_weight * halt.to(ce.dtype)

    # ----- inspection ----------------------------------------------------------------------------------
    @torch.no_grad()
    def inspect(self, input_ids, top_k: int = 3, halt_threshold=_FROM_CONFIG, supervision_steps=None,
                halt_criterion="head", **generate_kwargs) -> list[dict]:
        """Generate, then report for every generated token what the recursion did.

        Returns one dict per generated token of the first sequence:
            {"position", "token_id", "steps_used", "step_predictions": [{"step", "top_ids", "top_probs"}, ...]}
        `step_predictions` has one entry per supervision step the token actually ran (a halted token
        stopped thinking there). Uses one uncached forward over prompt + generation, which the cache
        tests show equals the cached decoding.
        """
        if input_ids.shape[0] != 1:
            raise ValueError("inspect() takes one prompt at a time (batch size 1)")
        control = dict(halt_threshold=halt_threshold, supervision_steps=supervision_steps,
                       halt_criterion=halt_criterion)
        sequences = self.generate(input_ids, **control, **generate_kwargs)
        sequences = sequences.sequences if hasattr(sequences, "sequences") else sequences
        out = self(sequences, use_cache=False, output_step_topk=top_k, **control)
        prompt_len = input_ids.shape[1]
        records = []
        for position in range(prompt_len, sequences.shape[1]):
            source = position - 1  # the position whose output predicted this token
            used = int(out.steps_used[0, source])
            records.append({
                "position": position,
                "token_id": int(sequences[0, position]),
                "steps_used": used,
                "step_predictions": [
                    {"step": s + 1, "top_ids": out.step_top_ids[s, 0, source].tolist(),
                     "top_probs": out.step_top_probs[s, 0, source].tolist()}
                    for s in range(used)
                ],
            })
        return records


__all__ = ["TRMForCausalLM", "TRMModel", "TRMPreTrainedModel", "TRMCausalLMOutputWithPast"]

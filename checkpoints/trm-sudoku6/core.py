"""The recursion of a Tiny Recursive Model, shared by the language model and the grid puzzles.

Paper (arXiv:2510.04871, Fig. 3) and official code, for one supervision step:

    for cycle in range(T):                      # the first T-1 cycles run under no_grad
        for _ in range(n):
            z = net(z + y + x)                   # latent update: sees the input
        y = net(y + z)                          # answer update: does not
    return y, z                                 # the caller detaches them before the next step

`net` is ONE tiny network (net_layers blocks of mixer + SwiGLU, post-norm RMSNorm without scale),
applied 'T * (n + 1)' times per step. Every application of every block is a *virtual layer* with its
own KV-cache slot, so cached decoding computes exactly what a full forward computes.

Per-token early exit (ACT) at inference: a position whose halting probability passed the threshold
is *frozen*: its y and z stop changing, and at every later virtual layer its keys/values are copied
from the same virtual layer of the previous supervision step ("copy-forward"), which, by induction,
is the last step it computed. Other positions keep attending to it as if it were still there.

This file must only use relative imports: it travels with saved models as remote code.
"""

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

IGNORE_INDEX = -100  # a label that no loss counts: what torch's cross-entropy and transformers' losses skip


def rms_norm(hidden: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a learnable scale (official TRM), computed in float32."""
    dtype = hidden.dtype
    hidden = hidden.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return hidden.to(dtype)


# Standard deviation of a standard normal truncated to [-2, 2]: sqrt(1 - 4 phi(2) / (Phi(2) - Phi(-2))) ~ 0.880.
_TRUNCATED_STD_AT_2 = math.sqrt(1.0 - 4.0 * math.exp(-2.0) / math.sqrt(2.0 * math.pi) / math.erf(math.sqrt(2.0)))


def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Truncated normal whose *actual* standard deviation is `std` (official `trunc_normal_init_`, JAX style).

    torch's `trunc_normal_(std=s)` has std 0.88 s after truncation at +-2 s, so the untruncated normal is
    widened by 1 / 0.88 and cut at +-2 of the widened std. Skips weights loaded from a checkpoint.
    """
    wide = std / _TRUNCATED_STD_AT_2
    return init.trunc_normal_(tensor, mean=0.0, std=wide, a=-2 * wide, b=2 * wide)


class HaltHead(nn.Linear):
    """Linear(D, 1) read from y: the logit of 'this answer is already right'."""


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, concatenated-halves convention (as the official TRM and Llama)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos/sin: (B, T, hd)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class SwiGLU(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(width, 2 * inner, bias=False)
        self.down_proj = nn.Linear(inner, width, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SelfAttention(nn.Module):
    """Multi-head self-attention (causal for text, bidirectional for grids) with a virtual-layer KV cache."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.causal = config.causal
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def project(self, hidden, rotary):
        """q, k, v: (B, nh, T, hd), rotary applied to q and k."""
        B, T, _ = hidden.shape
        q, k, v = self.qkv_proj(hidden).view(B, T, 3, self.num_heads, self.head_dim).transpose(1, 3).unbind(2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k, v

    def forward(self, hidden, rotary, attention_mask, cache, layer_idx):
        B, T, C = hidden.shape
        q, k, v = self.project(hidden, rotary)
        if isinstance(cache, RecursionCache) and cache.reads_context(layer_idx):
            out = cache.attend_with_context(q, k, v, layer_idx, attention_mask)
        else:
            if cache is not None:
                k, v = cache.update(k, v, layer_idx)  # (B, nh, past + T, hd); a StaticCache: (B, nh, max_len, hd)
            # No mask is only passed where upper-left causal alignment is right: no past (an empty cache, static
            # or dynamic), or keys == queries; a single query attends to every key it is given.
            is_causal = self.causal and attention_mask is None and T > 1
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, C))


class SequenceMLP(nn.Module):
    """TRM-MLP token mixer: a SwiGLU over the sequence axis (fixed length, bidirectional)."""

    def __init__(self, config):
        super().__init__()
        self.mlp = SwiGLU(config.sequence_length, config.sequence_mlp_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden.transpose(1, 2)).transpose(1, 2)  # mix over T, (B, T, C) in and out


class TRMBlock(GradientCheckpointingLayer):
    """mixer + SwiGLU, post-norm (official: h = norm(h + f(h))) or pre-norm (h = h + f(norm(h)))."""

    def __init__(self, config):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.eps = config.rms_norm_eps
        self.mixer_kind = config.mixer
        self.mixer = SelfAttention(config) if config.mixer == "attention" else SequenceMLP(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def _mix(self, hidden, rotary, attention_mask, cache, layer_idx):
        if self.mixer_kind == "attention":
            return self.mixer(hidden, rotary, attention_mask, cache, layer_idx)
        return self.mixer(hidden)

    def forward(self, hidden, rotary=None, attention_mask=None, cache=None, layer_idx=0):
        mix = (hidden, rotary, attention_mask, cache, layer_idx)
        if self.post_norm:
            if self.mixer_kind == "mlp":  # official TRM-MLP normalises the token-mixed stream over the sequence axis
                hidden = rms_norm((hidden + self._mix(*mix)).transpose(1, 2), self.eps).transpose(1, 2)
            else:
                hidden = rms_norm(hidden + self._mix(*mix), self.eps)
            return rms_norm(hidden + self.mlp(hidden), self.eps)
        hidden = hidden + self._mix(rms_norm(hidden, self.eps), *mix[1:])
        return hidden + self.mlp(rms_norm(hidden, self.eps))


def take_rows(tensor, rows):
    """tensor[rows] along the batch axis; a tensor broadcast over the batch (size 1) or None stays as it is."""
    return tensor if rows is None or tensor is None or tensor.shape[0] == 1 else tensor.index_select(0, rows)


class RecursionCache:
    """One forward pass's view of a transformers KV cache: virtual-layer slots and the ACT copy-forward.

    `cache` is any transformers Cache (DynamicCache, StaticCache, ...); `past` is its length before this
    chunk. Attention calls `update(k, v, layer_idx)` as with a plain cache; what early exit needs lives
    here, set once per supervision step by `halt(frozen, rows)`:
    - frozen (B, T) bool: halted positions. Their keys/values are not recomputed but copied from the same
      virtual layer of the previous step (by induction, the last step they computed).
    - rows: the batch rows still computing (None = all). The network runs on those rows only; a halted
      row's slots are filled by the copy alone, so a batch saves the work of every row that has stopped.

    Slots. Exact (default): one slot per virtual layer, so cached decoding computes what a full forward
    computes, at N_sup x the memory of one step. `shared=True` (inference): the supervision steps share
    one step's slots; each step overwrites this chunk's entries, so later tokens see every earlier token
    at the last step it computed (Ouro/Huginn style: KV memory / N_sup, not exact; a halted token is
    simply not overwritten). A wrapper rather than a Cache subclass: generate(), users and the batched
    server create the cache.

    `first_step_context=True` (a model trained with step_context="first_step"): the cache holds the first
    step's slots only. A later step's attention reads the earlier tokens' first-step keys/values (the
    token's own first-step entry included, as in the first step) followed by the chunk's own current ones,
    which only their own query sees (`attend_with_context`); nothing is written after the first step.
    Exact, as the model computes the same in training; halted tokens need no copy-forward and deeper runs
    no extra slots.
    """

    def __init__(self, cache, layers_per_step: int, past: int, shared: bool = False,
                 first_step_context: bool = False):
        if shared and first_step_context:
            raise ValueError("share_step_cache is for models trained with step_context='every_step'; this model's "
                             "cache already holds one step's keys/values")
        self.cache, self.layers_per_step, self.past, self.shared = cache, layers_per_step, past, shared
        self.first_step_context = first_step_context
        self.frozen, self.rows, self.partial = None, None, False
        self._masks = (None, None)  # (the mask it was built from, the later steps' mask)

    @property
    def layers(self):
        return self.cache.layers

    def slot(self, layer_idx: int) -> int:
        return layer_idx % self.layers_per_step if self.shared else layer_idx

    def halt(self, frozen, rows=None) -> bool:
        """Set this step's halted positions; returns whether a computing row has some (a prefill chunk does)."""
        self.frozen, self.rows = frozen, rows
        self.partial = frozen is not None and bool(take_rows(frozen, rows).any())
        return self.partial

    def chunk(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This chunk's keys/values in one slot (positions past .. past + length): (B, nh, length, hd)."""
        layer = self.cache.layers[slot]
        return layer.keys[:, :, self.past:self.past + length], layer.values[:, :, self.past:self.past + length]

    def update(self, k, v, layer_idx: int):
        """k, v: (rows, nh, T, hd) of the computing rows. Returns the keys/values those rows attend to."""
        first_step = layer_idx < self.layers_per_step
        if self.frozen is not None or (self.shared and not first_step):
            source = self.slot(layer_idx) if self.shared else layer_idx - self.layers_per_step
            old_k, old_v = self.chunk(source, k.shape[2])  # (B, nh, T, hd): the previous step's
            if self.rows is not None:
                k, v = old_k.index_copy(0, self.rows, k), old_v.index_copy(0, self.rows, v)
            if self.partial:
                keep = self.frozen[:, None, :, None]  # (B, 1, T, 1)
                k, v = torch.where(keep, old_k, k), torch.where(keep, old_v, v)
        if self.shared and not first_step:  # overwrite this chunk's entries in the shared slot
            old_k.copy_(k)
            old_v.copy_(v)
            layer = self.cache.layers[self.slot(layer_idx)]
            keys, values = layer.keys, layer.values
        else:
            keys, values = self.cache.update(k, v, self.slot(layer_idx))
        return take_rows(keys, self.rows), take_rows(values, self.rows)

    # ----- first-step context ----------------------------------------------------------------------------
    def reads_context(self, layer_idx: int) -> bool:
        """Whether this virtual layer attends to the first step's keys/values instead of writing its own."""
        return self.first_step_context and layer_idx >= self.layers_per_step

    def context(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first-step keys/values a later virtual layer reads, of the computing rows: (rows, nh, keys, hd)."""
        layer = self.cache.layers[layer_idx % self.layers_per_step]
        return take_rows(layer.keys, self.rows), take_rows(layer.values, self.rows)

    def attend_with_context(self, q, k, v, layer_idx: int, mask) -> torch.Tensor:
        """Attention of a later step: over the context (masked as the first step's), then each query's own k, v.

        q, k, v: (rows, nh, T, hd) of this layer; mask as SelfAttention gets it. Returns (rows, nh, T, hd)."""
        context_k, context_v = self.context(layer_idx)
        queries = q.shape[2]
        full_mask = self.context_attention_mask(mask, queries, context_k.shape[2])
        if queries > 1:
            return F.scaled_dot_product_attention(q, torch.cat([context_k, k], dim=2), torch.cat([context_v, v], dim=2),
                                                  attn_mask=full_mask)
        # one query (decoding): the softmax over (context, own key) in two parts, so the context is not copied
        scale = q.shape[-1] ** -0.5
        context_scores = (q @ context_k.transpose(-1, -2)) * scale  # (rows, nh, 1, keys)
        context_scores = context_scores.masked_fill(~full_mask[..., :-1], float("-inf"))
        own_score = (q * k).sum(-1, keepdim=True) * scale  # (rows, nh, 1, 1)
        weights = torch.softmax(torch.cat([context_scores, own_score], dim=-1).float(), dim=-1).to(q.dtype)
        return weights[..., :-1] @ context_v + weights[..., -1:] * v

    def context_attention_mask(self, mask, queries: int, context: int):
        """The mask of a later step with first-step context over (context keys, the chunk's own keys): the
        context masked as the first step's, each query's own key only for itself. Built once per forward pass.

        mask: None (upper-left causal for several queries, everything for one; see SelfAttention) or bool
        (B or 1, 1, T, context keys). Returns bool (B or 1, 1, T, context keys + T)."""
        source, built = self._masks
        if built is not None and source is mask:
            return built
        if mask is None:
            device = self.cache.layers[0].keys.device
            allowed = torch.ones(queries, context, dtype=torch.bool, device=device)
            context_mask = (allowed.tril() if queries > 1 else allowed)[None, None]
        elif mask.dtype == torch.bool:
            context_mask = mask
        else:
            raise ValueError(f"first-step context needs a boolean attention mask (sdpa), got {mask.dtype}")
        own = torch.eye(queries, dtype=torch.bool, device=context_mask.device)[None, None]
        own = own.expand(context_mask.shape[0], 1, queries, queries)
        built = torch.cat([context_mask, own], dim=-1)
        self._masks = (mask, built)
        return built

    def copy_forward(self, step: int, length: int) -> None:
        """Every position of the chunk has halted: fill this step's slots without running the network."""
        if self.shared or self.first_step_context:
            return  # the shared slots already hold each position's last computed step; first-step: nothing to fill
        first = step * self.layers_per_step
        for idx in range(first, first + self.layers_per_step):
            self.cache.update(*self.chunk(idx - self.layers_per_step, length), idx)


class TRMCore(nn.Module):
    """The tiny network and the recursion around it. Token- and task-agnostic: works on (B, T, D) states."""

    halted_rows_leave = True  # False while per-layer outputs are recorded (they need every row)

    def __init__(self, config):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.latent_steps, self.cycles, self.net_layers = config.latent_steps, config.cycles, config.net_layers
        self.backprop_all_cycles = config.backprop_all_cycles
        self.blocks = nn.ModuleList(TRMBlock(config) for _ in range(config.net_layers))
        self.eps = config.rms_norm_eps
        self.pre_norm = config.norm_position == "pre"
        if config.input_injection == "concat":
            self.combine_latent = nn.Linear(3 * D, D, bias=False)  # cat(z, y, x) -> D
            self.combine_answer = nn.Linear(2 * D, D, bias=False)  # cat(y, z) -> D
        self.rotary = (RotaryEmbedding(D // config.num_attention_heads, config.rope_theta)
                       if config.mixer == "attention" and config.position_encoding == "rope" else None)
        # Fixed random initial states, broadcast to every position (official: buffers, not parameters).
        self.register_buffer("y_init", trunc_normal_(torch.empty(D), std=1.0), persistent=True)
        self.register_buffer("z_init", trunc_normal_(torch.empty(D), std=1.0), persistent=True)
        # Halting head on y: P(this position's answer is already right). Starts almost never halting.
        self.halt_head = HaltHead(D, 1, bias=True)

    # ----- virtual layers -------------------------------------------------------------------------------
    @property
    def layers_per_step(self) -> int:
        return self.cycles * (self.latent_steps + 1) * self.net_layers

    def virtual_layer(self, step: int, cycle: int, update: int, block: int) -> int:
        """KV-cache slot of one block application: update < n is a z-update, update == n the y-update."""
        return ((step * self.cycles + cycle) * (self.latent_steps + 1) + update) * self.net_layers + block

    # ----- the recursion --------------------------------------------------------------------------------
    def initial_state(self, batch: int, length: int, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = dtype or self.y_init.dtype
        y = self.y_init.to(dtype).expand(batch, length, -1)
        z = self.z_init.to(dtype).expand(batch, length, -1)
        return y, z

    def net(self, hidden, base_layer, *, rotary=None, attention_mask=None, cache=None):
        for i, block in enumerate(self.blocks):
            hidden = block(hidden, rotary=rotary, attention_mask=attention_mask, cache=cache, layer_idx=base_layer + i)
        return rms_norm(hidden, self.eps) if self.pre_norm else hidden

    def inject_latent(self, z, y, x):
        if hasattr(self, "combine_latent"):
            return self.combine_latent(torch.cat([z, y, x], dim=-1))
        return z + y + x

    def inject_answer(self, y, z):
        if hasattr(self, "combine_answer"):
            return self.combine_answer(torch.cat([y, z], dim=-1))
        return y + z

    def supervision_step(self, x, y, z, step: int = 0, *, rotary=None, attention_mask=None, cache=None,
                         frozen=None):
        """One deep-supervision step: T cycles of (n latent updates, 1 answer update); gradient only in the last
        (in all of them with config.backprop_all_cycles).

        x, y, z: (B, T, D). `step` selects the KV-cache slots. `frozen` (B, T) bool marks halted positions
        (inference only, needs a RecursionCache): their y/z are returned unchanged, their K/V are copied
        forward, and rows with every position halted leave the computation.
        Returns the new (y, z), NOT detached: the caller decides what carries over.
        """
        rows = None
        if frozen is not None and not frozen.any():
            frozen = None
        if frozen is not None:
            if not isinstance(cache, RecursionCache):
                raise ValueError("frozen (halted) positions need a KV cache to copy their keys/values forward")
            running = ~frozen.all(dim=1)  # (B,) rows with a position still computing
            if not running.any():
                cache.copy_forward(step, x.shape[1])
                return y, z
            if self.halted_rows_leave and not running.all():
                rows = running.nonzero().squeeze(1)
            if not cache.halt(frozen, rows):
                frozen = None  # no computing row has a halted position (decoding): leaving rows is all it takes
        elif isinstance(cache, RecursionCache):
            cache.halt(None)
        common = dict(rotary=None if rotary is None else tuple(take_rows(t, rows) for t in rotary),
                      attention_mask=take_rows(attention_mask, rows), cache=cache)
        y_in, z_in = y, z
        x, y, z = take_rows(x, rows), take_rows(y, rows), take_rows(z, rows)
        for cycle in range(self.cycles):
            with torch.no_grad() if cycle < self.cycles - 1 and not self.backprop_all_cycles else nullcontext():
                for update in range(self.latent_steps):
                    z = self.net(self.inject_latent(z, y, x), self.virtual_layer(step, cycle, update, 0), **common)
                y = self.net(self.inject_answer(y, z), self.virtual_layer(step, cycle, self.latent_steps, 0), **common)
        if rows is not None:
            y, z = y_in.index_copy(0, rows, y), z_in.index_copy(0, rows, z)
        if frozen is not None:
            keep = frozen[..., None]
            y, z = torch.where(keep, y_in, y), torch.where(keep, z_in, z)
        return y, z

    def halt_logits(self, y: torch.Tensor) -> torch.Tensor:
        return self.halt_head(y).squeeze(-1).float()  # (B, T)



@torch.no_grad()
def init_trm_weights(module: nn.Module, std: float | None = None) -> None:
    """Official init for one module (use with `model.apply` or PreTrainedModel._init_weights).

    Linear/Embedding: truncated normal, std 1/sqrt(fan_in) (embeddings: 1/sqrt(D)) unless `std` is given;
    halt head: weight 0, bias -5 (P(halt) ~ 0.7% at the start); y/z initial states: truncated normal, std 1.
    """
    if isinstance(module, HaltHead):
        init.zeros_(module.weight)
        init.constant_(module.bias, -5.0)
    elif isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=std or 1.0 / math.sqrt(module.in_features))
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        trunc_normal_(module.weight, std=std or 1.0 / math.sqrt(module.embedding_dim))
    elif isinstance(module, RotaryEmbedding):  # not saved: recomputed after from_pretrained's meta-device init
        init.copy_(module.inv_freq, module.frequencies())
    elif isinstance(module, TRMCore):
        trunc_normal_(module.y_init, std=1.0)
        trunc_normal_(module.z_init, std=1.0)

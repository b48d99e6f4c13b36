"""NormGPT: the "norm-everywhere" GPT of Filatov, Wang, Ebert and Kesselheim (arXiv 2510.03871).

Read top to bottom: helpers (RMSNorm, RoPE, masks), attention, MLP, block, the chunked
linear + cross-entropy loss, the HF base model, and the causal LM head with loss and generation.

The idea: put a parameter-free RMSNorm in front of *every* linear layer, so each matrix always
sees inputs of RMS 1. Then the operator norms Scion controls (RMS->RMS for hidden matrices,
l1->RMS for the embedding, RMS->inf for the head) bound the size of every activation, and a step
of a given norm has the same effect at every width and depth. Concretely (SPEC section 2):

    x_attn = norm(x)                    -> Wq, Wk, Wv
    q, k, v = norm per head (head_dim)  (q, k before RoPE)
    y = SDPA(q, k, v), heads concatenated
    x = x + Wo(norm(y))
    x = x + W2(norm(silu(W1 norm(x)) * W3 norm(x)))
    logits = head(norm(x))

No norm has a gain and no linear layer has a bias: the only parameters are the embedding, the
hidden matrices and the head, i.e. exactly the three Scion roles. Embedding and head are untied.

Tensor parallelism (DeepSpeed AutoTP, see disco_ds/distributed/tensor_parallel.py) needs nothing from this file
but two inert hooks: head counts come from the projections' output width (a column-parallel Wq
yields this rank's heads), and the norms before Wo and W2 take their mean of squares over the
whole width when the row-parallel layer they feed splits its input (`sharded_rms_norm`); with
plain `nn.Linear` layers both are the ordinary computation.

This file must keep importing only torch, transformers and its sibling configuration file (see
configuration_norm_gpt.py for why).
"""

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_norm_gpt import NormGPTConfig

# ----------------------------------------------------------------------------- helpers


def _inverse_rms(xf, eps, width, group):
    """1/RMS of every row of float32 `xf` as [..., 1], over a last dimension of `width` entries of
    which this rank holds a slice when `group` is given (the partial sums of squares all-reduced)."""
    squares = xf.square().sum(dim=-1, keepdim=True)
    if group is not None:
        dist.all_reduce(squares, group=group)
    return torch.rsqrt(squares / width + eps)


class _RMSNorm(torch.autograd.Function):
    """y = x·r, r = (mean(x²) + eps)^(-1/2) per row, in float32 inside and returned in x's dtype.

    Autograd's own graph for the float32 computation would keep a float32 copy of x for backward:
    in a bf16 model, with a norm before every linear layer, those copies are a large share of the
    activation memory. This function keeps x in its own dtype and r (float32, one number per row)
    and computes the gradient from them, in float32:

        dx = r·(g − x·r²·mean(g·x))

    With a tensor-parallel `group` the row sums (of x² forward, of g·x backward) run over the whole
    width: each rank's gradient needs every rank's share of mean(g·x).
    """

    @staticmethod
    def forward(ctx, x, eps, width, group):
        xf = x.float()
        r = _inverse_rms(xf, eps, width, group)
        ctx.save_for_backward(x, r)
        ctx.width, ctx.group = width, group
        return (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, r = ctx.saved_tensors
        xf, gf = x.float(), grad.float()
        dot = (gf * xf).sum(dim=-1, keepdim=True)
        if ctx.group is not None:
            dist.all_reduce(dot, group=ctx.group)
        return (r * (gf - xf * (r.square() * dot / ctx.width))).to(x.dtype), None, None, None


def rms_norm(x, eps):
    """Parameter-free RMSNorm over the last dimension, computed in float32.

    Upcasting keeps bf16 models numerically safe (the mean of squares is taken in float32) and
    makes the result independent of the model dtype up to the final rounding. Autograd keeps no
    float32 copy of x (see `_RMSNorm`).
    """
    return sharded_rms_norm(x, eps, x.size(-1))


def sharded_rms_norm(x, eps, width, group=None):
    """RMSNorm over a last dimension of `width` entries that tensor parallelism splits over `group`.

    Each rank holds a slice of the dimension (e.g. its heads before a row-parallel Wo); the mean of
    squares is taken over the whole dimension (all-reduced partial sums, float32), never per shard,
    so the result equals `rms_norm` of the unsplit tensor. With no group this *is* `rms_norm`.

    With a gradient to compute this runs `_RMSNorm`; without (inference, generation, export) the
    same arithmetic runs as plain operations, fused by `F.rms_norm` when nothing is sharded.
    """
    if group is None:
        width = x.size(-1)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RMSNorm.apply(x, eps, width, group)
    if group is None:
        return F.rms_norm(x.float(), (width,), eps=eps).type_as(x)
    xf = x.float()
    return (xf * _inverse_rms(xf, eps, width, group)).type_as(x)


def row_parallel_group(linear):
    """The tensor-parallel group over which `linear` splits its *input* dimension, or None.

    DeepSpeed AutoTP replaces a row-parallel `nn.Linear` by a layer carrying `mp_group` and
    `tp_world_size` (duck-typed here: this file imports no DeepSpeed). A plain `nn.Linear` has
    neither, so without tensor parallelism the norms below are the ordinary ones.
    """
    if getattr(linear, "tp_world_size", 1) > 1:
        return getattr(linear, "mp_group", None)
    return None


def _is_whole_linear(linear):
    """Whether `linear` is a plain `nn.Linear` holding its whole weight: not a tensor-parallel
    replacement (duck-typed as in `row_parallel_group`), whose weight is one rank's shard."""
    return isinstance(linear, nn.Linear) and getattr(linear, "tp_world_size", 1) == 1


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """cos/sin tables for RoPE: positions [B, T] (B may be 1) -> [B, T, 1, head_dim/2].

    Computed on the fly from position_ids (cheap: B*T*head_dim/2 values) rather than cached in a
    buffer, so the model has no non-persistent buffers that meta-device construction or
    `from_pretrained` would have to re-create.
    """
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = theta**-exponent
    angles = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    return angles.cos()[:, :, None, :].to(dtype), angles.sin()[:, :, None, :].to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + head_dim/2) of x [B, T, H, head_dim] by the position angle.

    A rotation preserves the L2 norm of each head vector, so q and k keep RMS 1 after RoPE.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class AttentionMask:
    """What decides which keys each query may attend to, turned into an SDPA mask per layer.

    Built once per forward from public inputs only (the padding mask, the positions, the cache's
    length); the mask itself is made in the attention layer, after the cache update, because only
    then is the number of keys known (a static cache returns all of its slots, filled or not).
    Every decision below depends on which inputs are present and on shapes, never on their
    values, so the forward compiles with `fullgraph=True` and exports with `torch.export`.

    Args:
        dense: a ready 4-D mask [B or 1, 1, queries, keys] (bool: True = attend; float: added to
            the scores), as `generate` builds for compilable caches. Used as given.
        padding: 2-D key mask [B, keys seen so far] (1 = token, 0 = padding).
        query_slots: cache slot of every query [queries] when a cache is in use: keys beyond a
            query's slot are the future (or unfilled static-cache slots). None without a cache.
        documents: document index of every token [B or 1, queries] for packed rows (positions that
            restart at 0 start a new document); None when rows are single documents.
    """

    def __init__(self, dense=None, padding=None, query_slots=None, documents=None):
        self.dense, self.padding, self.query_slots, self.documents = dense, padding, query_slots, documents

    def for_keys(self, n_keys, device):
        """(attn_mask, is_causal) for `F.scaled_dot_product_attention` over `n_keys` keys."""
        if self.dense is not None:
            return self.dense, False
        if self.padding is None and self.query_slots is None and self.documents is None:
            return None, True  # plain causal attention: SDPA's fused causal path, no mask tensor
        keys = torch.arange(n_keys, device=device)
        # Without a cache queries and keys are the same tokens. With one, SDPA's is_causal would
        # align the triangle top-left, which is wrong once there are fewer queries than keys; an
        # explicit bottom-right triangle from the query slots is right for every cache.
        queries = keys if self.query_slots is None else self.query_slots
        same = keys[None, :] == queries[:, None]
        mask = (keys[None, :] <= queries[:, None])[None, None]  # [1, 1, queries, keys]
        if self.documents is not None:
            mask = mask & (self.documents[:, :, None] == self.documents[:, None, :])[:, None]
        if self.padding is not None:
            padding = self.padding.bool()
            if padding.shape[-1] < n_keys:  # a static cache's unfilled slots: the causal part masks them
                padding = F.pad(padding, (0, n_keys - padding.shape[-1]), value=True)
            mask = mask & padding[:, None, None, :]
            # A padding query may have no unmasked key at all. torch's CPU kernels return zeros for
            # such a row, but a kernel that returns NaN would leak it into real tokens through
            # 0 * NaN in later layers. Letting every query see itself keeps padding rows finite on
            # any backend; real tokens already see themselves, so they are unaffected.
            mask = mask | same[None, None]
        return mask, False


def document_ids(position_ids):
    """Document index of every token of packed rows: a position that restarts at 0 opens a new
    document (what `DataCollatorWithFlattening` and the trainer's document masking produce)."""
    return (position_ids == 0).cumsum(dim=-1)


def eager_attention(q, k, v, attn_mask, is_causal, scale):
    """Attention written out, returning (output, weights [B, heads, queries, keys]).

    Numerically the same computation as SDPA (scores in float32, masked scores set to the dtype's
    minimum rather than -inf so that a fully masked row stays finite, as HF's eager paths do).
    """
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each KV head serves a group of queries
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(weights, v), weights


# ----------------------------------------------------------------------------- layers


class NormGPTAttention(nn.Module):
    """Causal self-attention with per-head q/k/v RMSNorm, RoPE and a norm before Wo."""

    def __init__(self, config: NormGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config  # read at call time: `attn_implementation` may change after construction
        self.layer_idx = layer_idx  # which slot of the KV cache belongs to this layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.eps, self.qkv_norm, self.rope_theta = config.norm_eps, config.qkv_norm, config.rope_theta
        d = config.d_model
        self.wq = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, d, bias=False)
        self.wo.is_residual_out = True  # read by _init_weights: the branch's last matrix

    def forward(self, x, cos, sin, mask, cache=None, cache_position=None, output_attentions=False):
        """x [B, T, d] (already normalised by the block) -> (output [B, T, d], weights or None)."""
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism Wq/Wk/Wv are column-parallel and yield this rank's heads.
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.qkv_norm:
            # Per head over head_dim: every head's query, key and value has RMS 1, so attention
            # logits are bounded by sqrt(head_dim) whatever the weights grow to.
            q, k, v = rms_norm(q, self.eps), rms_norm(k, self.eps), rms_norm(v, self.eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        if cache is not None:
            # The cache stores post-RoPE keys and values and returns every key so far (a static cache:
            # all of its slots). transformers 4.x static caches need the slots; 5.x tracks them itself.
            k, v = cache.update(k, v, self.layer_idx, {"cache_position": cache_position})
        attn_mask, is_causal = mask.for_keys(k.shape[-2], x.device)
        scale = 1.0 / math.sqrt(self.head_dim)
        weights = None
        if output_attentions or getattr(self.config, "_attn_implementation", None) == "eager":
            y, weights = eager_attention(q, k, v, attn_mask, is_causal, scale)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
            )
        y = y.transpose(1, 2).reshape(B, T, -1)
        # The concatenated heads are a sum of convex combinations of unit-RMS values; normalise
        # again so Wo, like every other matrix, sees RMS-1 input. Over all n_head * head_dim
        # entries: with a row-parallel Wo this rank holds only its heads' slice.
        y = self.wo(sharded_rms_norm(y, self.eps, self.n_head * self.head_dim, row_parallel_group(self.wo)))
        return y, weights


class NormGPTMLP(nn.Module):
    """SwiGLU feed-forward with an RMSNorm on the gated product before W2."""

    def __init__(self, config: NormGPTConfig):
        super().__init__()
        self.eps, self.hidden = config.norm_eps, config.ffn_hidden_size
        self.w1 = nn.Linear(config.d_model, config.ffn_hidden_size, bias=False)  # gate
        self.w3 = nn.Linear(config.d_model, config.ffn_hidden_size, bias=False)  # up
        self.w2 = nn.Linear(config.ffn_hidden_size, config.d_model, bias=False)  # down
        self.w2.is_residual_out = True  # read by _init_weights: the branch's last matrix

    def forward(self, x):
        # x is already normalised by the block (the "block input before the FFN" norm).
        # Normalised over the whole FFN width, also when a row-parallel W2 holds only a slice of it.
        h = F.silu(self.w1(x)) * self.w3(x)
        return self.w2(sharded_rms_norm(h, self.eps, self.hidden, row_parallel_group(self.w2)))


class NormGPTBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block. Subclassing GradientCheckpointingLayer gives HF's activation
    checkpointing: the hidden states are passed positionally so they flow through the checkpoint."""

    def __init__(self, config: NormGPTConfig, layer_idx: int):
        super().__init__()
        self.eps = config.norm_eps
        self.attn = NormGPTAttention(config, layer_idx)
        self.mlp = NormGPTMLP(config)
        # "none": x + f(x). "depth": the authors' complete_p, x + f(x) / (2L) (see the config).
        self.residual_scale = 1.0 if config.residual_scaling == "none" else 1.0 / (2 * config.n_layer)

    def forward(self, hidden_states, cos=None, sin=None, mask=None, cache=None, cache_position=None, output_attentions=False):
        """-> (hidden_states, attention weights or None)."""
        x = hidden_states
        y, weights = self.attn(rms_norm(x, self.eps), cos, sin, mask, cache, cache_position, output_attentions)
        x = x + self.residual_scale * y
        x = x + self.residual_scale * self.mlp(rms_norm(x, self.eps))
        return x, weights


# ----------------------------------------------------------------------------- loss

# Logits one chunk of `linear_cross_entropy` holds at a time: 32 Mi (128 MiB in float32). At a
# 50k vocabulary that is ~670 tokens, a matmul still large enough to keep an accelerator busy.
LOSS_CHUNK_LOGITS = 1 << 25


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, a chunk of tokens at a time.

    Forward keeps, per token, only the float32 log-sum-exp of its logits; backward recomputes each
    chunk's logits from hidden and weight instead of keeping them (one more head matmul, in
    exchange for never holding [tokens, vocab]). Each chunk's logits are made in `compute_dtype`
    (the autocast dtype under autocast, else the inputs'), the softmax is taken in float32, and
    the gradients are computed in `compute_dtype` as autograd would for the unchunked expression;
    the weight's gradient is summed over the chunks in float32. Each chunk works in place in its
    float32 logits, so a chunk holds one [chunk, vocab] float32 buffer at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk, compute_dtype):
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            stop = min(start + chunk, hidden.shape[0])
            logits = F.linear(hidden[start:stop].to(compute_dtype), w).float()
            t = targets[start:stop]
            valid = t != ignore_index
            # Ignored tokens gather from class 0 (ignore_index may be negative) and are masked out.
            picked = logits.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
            # log-sum-exp in place: one [chunk, vocab] buffer, where torch.logsumexp would add two.
            top = logits.amax(dim=-1, keepdim=True)
            lse[start:stop] = logits.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(1))
            total += torch.where(valid, lse[start:stop] - picked, 0.0).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.ignore_index, ctx.chunk, ctx.compute_dtype = ignore_index, chunk, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        w = weight.to(ctx.compute_dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # One chunk: its product is the gradient. Several: summed in float32, so that a bf16
        # gradient is rounded once, not once per chunk (for a bf16 weight a float32 copy of its
        # gradient: as many bytes as the float32 logits of d_model tokens).
        several = hidden.shape[0] > ctx.chunk
        grad_weight = None
        if need_weight and several:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            stop = min(start + ctx.chunk, hidden.shape[0])
            h = hidden[start:stop].to(ctx.compute_dtype)
            t = targets[start:stop]
            valid = t != ctx.ignore_index
            # d(lse - logit_t)/dlogits = softmax - onehot(t), scaled by the incoming gradient;
            # in place in the recomputed logits, the chunk's only [chunk, vocab] float32 buffer.
            grad_logits = F.linear(h, w).float().sub_(lse[start:stop, None]).exp_()
            grad_logits.scatter_add_(1, torch.where(valid, t, 0)[:, None], -valid.float()[:, None])
            grad_logits.mul_(torch.where(valid, grad_total, 0.0)[:, None])
            grad_logits = grad_logits.to(ctx.compute_dtype)
            if need_hidden:
                grad_hidden[start:stop] = grad_logits @ w
            if need_weight and several:
                grad_weight += grad_logits.t() @ h
            elif need_weight:
                grad_weight = grad_logits.t() @ h
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, chunk_size=None):
    """Sum over tokens of cross_entropy(hidden @ weight.T, targets), without [tokens, vocab] logits.

    hidden [..., d] and targets [...] (tokens equal to `ignore_index` count for nothing); weight
    [vocab, d], e.g. the output layer's. Returns a float32 scalar: divide by the number of counted
    tokens for the mean. Autograd keeps hidden, weight and one float32 number per token; the logits
    exist one chunk of `chunk_size` tokens at a time (default: `LOSS_CHUNK_LOGITS // vocab`), in
    forward and again in backward. Under autocast the logits are made in the autocast dtype, as
    `F.linear` would make them.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_cross_entropy: {targets.shape[0]} targets for {hidden.shape[0]} hidden states")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    chunk = chunk_size or max(1, LOSS_CHUNK_LOGITS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk, compute_dtype)


# ----------------------------------------------------------------------------- HF models

# transformers 5.24 renamed the cache from `past_key_values` to `cache`, in `forward`'s arguments and in
# the output classes (the old names still work there, with a deprecation warning). NormGPT accepts
# both names and fills the output field this version declares.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# Keyword arguments callers send that NormGPT may ignore, and why. Any other unused keyword warns
# once, naming it, so that the next renamed argument is seen at once.
IGNORED_KWARGS = {
    "cache_position": "transformers 4.x generate(); the cache's own length gives the positions",
    "cu_seq_lens_q": "flash-attention varlen metadata; documents are read from position_ids",
    "cu_seq_lens_k": "flash-attention varlen metadata; documents are read from position_ids",
    "max_length_q": "flash-attention varlen metadata; documents are read from position_ids",
    "max_length_k": "flash-attention varlen metadata; documents are read from position_ids",
}
# The causal LM passes these to `self.loss_function`.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
_warned_kwargs = set()


def _warn_unused_kwargs(kwargs):
    for name in kwargs:
        if name not in IGNORED_KWARGS and name not in _warned_kwargs:
            _warned_kwargs.add(name)
            warnings.warn(f"NormGPT ignores the keyword argument {name!r}", stacklevel=3)


def _pick(value, default):
    return default if value is None else value


def _resolve_cache(past_key_values, cache):
    """The cache under either of its names (see `_CACHE_FIELD`)."""
    if past_key_values is not None and cache is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    cache = past_key_values if cache is None else cache
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError("the cache must be a transformers Cache (e.g. DynamicCache), not legacy tuples")
    return cache


class NormGPTPreTrainedModel(PreTrainedModel):
    config_class = NormGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NormGPTBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True  # SDPA is the default; "eager" writes attention out and can return its weights
    _supports_static_cache = True  # transformers 4.x asks before building a static cache
    _can_compile_fullgraph = True  # no data-dependent branches (see AttentionMask)

    @torch.no_grad()
    def _init_weights(self, module):
        """Scion-consistent init: every parameter starts on the unit sphere of its norm.

        - embedding [vocab, d]: every row (token vector) has RMS `init_embed_rms`;
        - hidden matrices [d_out, d_in]: semi-orthogonal * sqrt(d_out/d_in), i.e. every singular
          value is sqrt(d_out/d_in) and the RMS->RMS operator norm is exactly `init_hidden_gain`;
        - head [vocab, d]: every row has L2 norm `init_head_rms_inf / sqrt(d)`, so the RMS->inf
          operator norm sqrt(d) * max_i ||W[i, :]|| equals `init_head_rms_inf`;
        - the last matrix of every residual branch (Wo, W2) is further scaled by
          `config.residual_out_gain` (the paper's 1/sqrt(2 n_layer) by default).
        """
        weight = getattr(module, "weight", None)
        if not isinstance(module, (nn.Embedding, nn.Linear)) or weight is None:
            return
        # Placeholders have nothing to initialise: meta tensors (shape-only construction) and empty
        # ZeRO-3 partitions. (Weights loaded by from_pretrained never get here: transformers skips
        # modules whose parameters all came from the checkpoint, and ours have one parameter each.)
        if weight.is_meta or weight.numel() == 0:
            return
        cfg = self.config
        w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        if isinstance(module, nn.Embedding):
            torch.nn.init.normal_(w)
            w *= cfg.init_embed_rms * math.sqrt(w.shape[1]) / w.norm(dim=1, keepdim=True)
        elif module is getattr(self, "lm_head", None):
            torch.nn.init.normal_(w)
            w *= cfg.init_head_rms_inf / math.sqrt(w.shape[1]) / w.norm(dim=1, keepdim=True)
        else:
            torch.nn.init.orthogonal_(w)  # float32 QR: orthogonal_ does not support bf16
            d_out, d_in = w.shape
            w *= cfg.init_hidden_gain * math.sqrt(d_out / d_in)
            if getattr(module, "is_residual_out", False):
                w *= cfg.residual_out_gain
        weight.copy_(w)


class NormGPTModel(NormGPTPreTrainedModel):
    """Embedding, blocks and final norm; returns the normalised last hidden state."""

    def __init__(self, config: NormGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(NormGPTBlock(config, i) for i in range(config.n_layer))
        self.gradient_checkpointing = False  # flipped by gradient_checkpointing_enable(), like the blocks' flag
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache=None,
        **kwargs,
    ):
        """Hidden states of `input_ids` (or `inputs_embeds`) [B, T].

        attention_mask: 2-D [B, cached + new tokens] (1 = token, 0 = padding) or a ready 4-D mask.
        position_ids: [B or 1, T]; without a cache, positions that restart at 0 inside a row mark
            packed documents, and each token then attends only within its document.
        cache / past_key_values: a transformers `Cache` to read and extend (either name).
        hidden_states (with output_hidden_states): the embeddings, every block's output but the
            last, and the final normalised output (= last_hidden_state), as in Llama.
        """
        _warn_unused_kwargs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cfg = self.config
        output_attentions = _pick(output_attentions, cfg.output_attentions)
        output_hidden_states = _pick(output_hidden_states, cfg.output_hidden_states)
        return_dict = _pick(return_dict, cfg.return_dict)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]

        cache = _resolve_cache(past_key_values, cache)
        if use_cache is None:
            # By default cache only at inference: in training the cache would just keep every
            # layer's keys and values alive until the caller drops the output.
            use_cache = cfg.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputation would append to the cache a second time
        fresh_cache = use_cache and cache is None
        if fresh_cache:
            cache = DynamicCache()
        past_len = cache.get_seq_length() if cache is not None and not fresh_cache else 0
        slots = torch.arange(T, device=x.device) + past_len if cache is not None else None

        documents = None
        if position_ids is None:
            # Positions continue after the cache. Rows of a left-padded batch need no offsets of
            # their own: RoPE scores depend only on the distance between query and key.
            position_ids = torch.arange(T, device=x.device)[None, :] + past_len
        else:
            if position_ids.dim() == 1:
                position_ids = position_ids[None, :]
            if cache is None or fresh_cache:  # nothing cached: the rows may be packed documents
                documents = document_ids(position_ids)  # a single document is plain causal
        if attention_mask is not None and attention_mask.dim() not in (2, 4):
            raise ValueError("attention_mask must be 2-D [batch, cached + new tokens] or a 4-D attention mask")
        mask = AttentionMask(
            dense=attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None,
            padding=attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None,
            query_slots=slots,
            documents=documents,
        )
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)

        hidden_states, attentions = (), ()
        for layer in self.layers:
            if output_hidden_states:
                hidden_states += (x,)
            x, weights = layer(
                x, cos=cos, sin=sin, mask=mask, cache=cache, cache_position=slots, output_attentions=output_attentions
            )
            if output_attentions:
                attentions += (weights,)
        x = rms_norm(x, cfg.norm_eps)  # final norm before the head
        if output_hidden_states:
            hidden_states += (x,)

        output = BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=attentions if output_attentions else None,
            **{_CACHE_FIELD: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


class NormGPTForCausalLM(NormGPTPreTrainedModel, GenerationMixin):
    """NormGPTModel plus an untied linear head. Works with generate(), Trainer and the Auto classes."""

    def __init__(self, config: NormGPTConfig):
        super().__init__(config)
        self.model = NormGPTModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        cache=None,
        return_logits=True,
        **kwargs,
    ):
        """Logits for the (last `logits_to_keep`, 0 = all) positions; with `labels` (same shape as
        input_ids, -100 = ignore) also the next-token loss. Labels are shifted inside the loss, as in
        every HF causal LM. The Trainer's `num_items_in_batch` (and `ignore_index`, `shift_labels`)
        go to `self.loss_function`, which then normalises by that count instead of the local mean.

        return_logits=False (needs `labels`): the loss only, `logits` is None. The loss is then the
        same one computed by `linear_cross_entropy`, a chunk of tokens at a time, so that no
        [tokens, vocab] logits exist at once, in forward or backward (what a pretraining step wants:
        at a 50k vocabulary the float32 logits of 16k tokens are 3.2 GB). A tensor-parallel head
        (its weight a shard of the vocabulary) takes the ordinary path and drops the logits.

        Every other argument is the base model's (`NormGPTModel.forward`)."""
        if not return_logits and labels is None:
            raise ValueError("return_logits=False returns the loss only: pass labels")
        loss_kwargs = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        loss = logits = None
        if not return_logits and _is_whole_linear(self.lm_head):
            loss = self._chunked_loss(hidden, labels, **loss_kwargs)
        else:
            # Generation asks for the last position only; skipping the other rows of the vocab-wide
            # matmul is the single largest saving there.
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
            if not return_logits:
                logits = None

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: outputs[_CACHE_FIELD] if _CACHE_FIELD in outputs else None},
        )
        return output if _pick(return_dict, self.config.return_dict) else output.to_tuple()

    def _chunked_loss(self, hidden, labels, num_items_in_batch=None, ignore_index=-100, shift_labels=None):
        """The loss `self.loss_function` gives for these labels (HF's causal-LM loss: shifted
        labels unless `shift_labels` is given, mean over counted tokens or sum / num_items_in_batch),
        from the final hidden states by `linear_cross_entropy`."""
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        total = linear_cross_entropy(hidden, self.lm_head.weight, shift_labels, ignore_index)
        if num_items_in_batch is None:
            num_items_in_batch = (shift_labels != ignore_index).sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch


__all__ = ["NormGPTPreTrainedModel", "NormGPTModel", "NormGPTForCausalLM"]

"""Configuration of the norm-everywhere GPT (NormGPT).

This file and modeling_norm_gpt.py are the whole model. They import only each other, torch and
transformers, so `save_pretrained` can copy them next to the weights and anyone can load the
checkpoint with `trust_remote_code=True`, without the disco_ds package. Keep it that way: no
imports from disco_ds or models.* here.

Shapes are the ones of SPEC section 2. The size presets ("tiny", the GPT ladder "124m" ... "1.3b",
and the paper's family "paper-proxy", "paper-w4", "paper-w12", "paper-d8", "paper-d32") are
available through `NormGPTConfig.from_preset`, and
`NormGPTConfig.parameter_counts()` gives exact parameter counts from the config alone.
"""

import logging
import math

try:  # transformers >= 5 renamed the base class; 4.x only has the old name
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover - exercised on transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig

logger = logging.getLogger(__name__)

# GPT-2's 50,257 tokens padded to a multiple of 128, as in the recipes.
GPT2_PADDED_VOCAB = 50304
# The Llama-3 tokenizer's vocabulary, the paper's (arXiv 2510.03871, appendix A.2).
LLAMA3_VOCAB = 128256


def _paper_model(n_layer, d_model):
    """The paper's Llama-3-style family: heads of 64 (as many KV heads as query heads), SwiGLU width
    2.75 d, the Llama-3 vocabulary, sequences of 4096, norm eps 1e-20 (its appendix A.2)."""
    return dict(
        vocab_size=LLAMA3_VOCAB,
        d_model=d_model,
        n_layer=n_layer,
        n_head=d_model // 64,
        head_dim=64,
        ffn_hidden_size=int(2.75 * d_model),
        max_position_embeddings=4096,
        norm_eps=1e-20,
    )


# Shapes of the named sizes. Everything not listed falls back to the constructor defaults
# (head_dim 128, SwiGLU hidden 8d/3 rounded up to 64, RoPE 10,000, ...).
PRESETS = {
    # For tests and demos: small enough to run many forward/backward passes on a laptop CPU.
    "tiny": dict(vocab_size=512, d_model=128, n_layer=2, n_head=4, head_dim=32, max_position_embeddings=256),
    # GPT-2 / GPT-3 family widths and depths with 128-wide heads (SPEC 2).
    "124m": dict(vocab_size=GPT2_PADDED_VOCAB, d_model=768, n_layer=12, n_head=6),
    "350m": dict(vocab_size=GPT2_PADDED_VOCAB, d_model=1024, n_layer=24, n_head=8),
    "760m": dict(vocab_size=GPT2_PADDED_VOCAB, d_model=1536, n_layer=24, n_head=12),
    "1.3b": dict(vocab_size=GPT2_PADDED_VOCAB, d_model=2048, n_layer=24, n_head=16),
    # The paper's model family: the 69M proxy and its width and depth scalings.
    "paper-proxy": _paper_model(4, 256),  # 69M, most of it the two embeddings
    "paper-w4": _paper_model(4, 1024),  # 314M
    "paper-w12": _paper_model(4, 3072),  # 1.25B, the paper's "1.3B"
    "paper-d8": _paper_model(32, 256),  # 91M
    "paper-d32": _paper_model(128, 256),  # 168M
}

RESIDUAL_SCALINGS = ("none", "depth")


def _round_up(x, multiple):
    return multiple * math.ceil(x / multiple)


class NormGPTConfig(_BaseConfig):
    r"""Configuration of a norm-everywhere GPT.

    Args:
        vocab_size: rows of the token embedding and of the output head.
        d_model: width of the residual stream (alias `hidden_size`).
        n_layer: number of transformer blocks (alias `num_hidden_layers`).
        n_head: query heads (alias `num_attention_heads`); default `d_model // head_dim`.
        n_kv_head: key/value heads for grouped-query attention (alias `num_key_value_heads`);
            default `n_head` (plain multi-head attention).
        head_dim: width of one head. The attention width `n_head * head_dim` may differ from d_model.
        ffn_hidden_size: SwiGLU hidden width (alias `intermediate_size`); default `int(8 d / 3)`
            rounded up to a multiple of `ffn_multiple_of`.
        ffn_multiple_of: rounding multiple of the default SwiGLU width.
        rope_theta: RoPE base.
        norm_eps: epsilon of every (parameter-free) RMSNorm. The authors use 1e-20; we default to
            1e-6. The norms compute in float32 whatever the model dtype, so both are representable;
            eps only matters for vectors with RMS near zero, where 1e-6 bounds the gradient of the
            normalisation (1/sqrt(eps)) instead of letting it reach 1e10. For inputs with RMS ~1 the
            difference to 1e-20 is a relative 5e-7.
        max_position_embeddings: longest sequence the model is meant for (RoPE itself has no limit;
            HF generation utilities read it).
        qkv_norm: RMS-normalise q, k and v per head (the norm-everywhere placement). False keeps all
            other norms and is only meant for ablations.
        residual_scaling: "none" gives plain residuals `x + f(x)` (the authors' default). "depth"
            gives the authors' `complete_p` option, `x + f(x) / (2 L)`: each of the 2L residual
            branches is shrunk by the number of branches (CompleteP's depth-muP, alpha = 1).
        init_embed_rms: RMS of every embedding row at init (Scion's l1->RMS geometry: 1).
        init_hidden_gain: hidden matrices start as `gain * sqrt(d_out/d_in) * semi-orthogonal`, i.e.
            with RMS->RMS operator norm `gain` (Scion's spectral geometry: 1).
        init_head_rms_inf: RMS->inf operator norm of the output head at init, i.e. every head row has
            L2 norm `init_head_rms_inf / sqrt(d_model)` (Scion's row-norm geometry: 1).
        init_residual_out: extra factor on the init of the last matrix of every residual branch
            (attention Wo, MLP W2). None: the paper's total-depth init 1/sqrt(2 n_layer), so that the
            2L branches together add an update of the same size whatever the depth; 1.0 turns it off.
            The residual connections themselves stay unscaled (see `residual_scaling`).
        tie_word_embeddings: must be False. Embedding and head live in different geometries (Scion
            treats them with different LMOs), so they are never shared. Set explicitly because
            transformers 4.x defaults to True when a config does not say.
    """

    model_type = "norm_gpt"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Names generic Hugging Face tooling reads (Trainer, generation, DeepSpeed's auto config, ...).
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "intermediate_size": "ffn_hidden_size",
    }

    def __init__(
        self,
        vocab_size=GPT2_PADDED_VOCAB,
        d_model=768,
        n_layer=12,
        n_head=None,
        n_kv_head=None,
        head_dim=128,
        ffn_hidden_size=None,
        ffn_multiple_of=64,
        rope_theta=10000.0,
        norm_eps=1e-6,
        max_position_embeddings=1024,
        qkv_norm=True,
        residual_scaling="none",
        init_embed_rms=1.0,
        init_hidden_gain=1.0,
        init_head_rms_inf=1.0,
        init_residual_out=None,
        use_cache=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        # The HF aliases may arrive as keyword arguments (e.g. from generic tooling). Resolve them
        # here, before deriving defaults, instead of letting the base class overwrite the fields later.
        d_model = kwargs.pop("hidden_size", d_model)
        n_layer = kwargs.pop("num_hidden_layers", n_layer)
        n_head = kwargs.pop("num_attention_heads", n_head)
        n_kv_head = kwargs.pop("num_key_value_heads", n_kv_head)
        ffn_hidden_size = kwargs.pop("intermediate_size", ffn_hidden_size)

        if n_head is None:
            if d_model % head_dim:
                raise ValueError(f"d_model={d_model} is not a multiple of head_dim={head_dim}; pass n_head")
            n_head = d_model // head_dim
        if n_kv_head is None:
            n_kv_head = n_head
        if n_head % n_kv_head:
            raise ValueError(f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}")
        if ffn_hidden_size is None:
            ffn_hidden_size = _round_up(int(8 * d_model / 3), ffn_multiple_of)
        if residual_scaling not in RESIDUAL_SCALINGS:
            raise ValueError(f"residual_scaling must be one of {RESIDUAL_SCALINGS}, got {residual_scaling!r}")
        if tie_word_embeddings:
            raise ValueError("NormGPT never ties embedding and head (tie_word_embeddings must be False)")

        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = head_dim
        self.ffn_hidden_size = ffn_hidden_size
        self.ffn_multiple_of = ffn_multiple_of
        self.rope_theta = float(rope_theta)
        self.norm_eps = float(norm_eps)
        self.max_position_embeddings = max_position_embeddings
        self.qkv_norm = bool(qkv_norm)
        self.residual_scaling = residual_scaling
        self.init_embed_rms = float(init_embed_rms)
        self.init_hidden_gain = float(init_hidden_gain)
        self.init_head_rms_inf = float(init_head_rms_inf)
        self.init_residual_out = None if init_residual_out is None else float(init_residual_out)
        self.use_cache = use_cache
        # transformers 5 no longer declares these on the base class, 4.x does: set them ourselves
        # and pass them on, so both versions see the same values.
        self.tie_word_embeddings = False
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=False,
            **kwargs,
        )

    @property
    def residual_out_gain(self):
        """The init factor of every residual branch's output matrix (see `init_residual_out`)."""
        if self.init_residual_out is None:
            return 1.0 / math.sqrt(2 * self.n_layer)
        return self.init_residual_out

    # ---------------------------------------------------------------- sizes

    @classmethod
    def from_preset(cls, name, **overrides):
        """A config for one of `PRESETS` (see the module docstring), with any field overridden by
        keyword. Logs its parameter counts at INFO level."""
        key = name.lower()
        if key not in PRESETS:
            raise KeyError(f"unknown NormGPT preset {name!r}; choose from {sorted(PRESETS)}")
        config = cls(**{**PRESETS[key], **overrides})
        logger.info("NormGPT preset %s: %s", key, config.describe())
        return config

    def parameter_counts(self):
        """Exact parameter counts from the shapes alone (no model is built).

        Returns a dict with `total`, `embedding` (token embedding), `head` (output layer) and
        `non_embedding` (= total minus embedding and head: what scales with depth and width).
        The norms have no parameters and there are no biases, so only the linear maps count.
        """
        d, h = self.d_model, self.head_dim
        q_width, kv_width = self.n_head * h, self.n_kv_head * h
        attention = d * q_width + 2 * d * kv_width + q_width * d  # Wq, Wk, Wv, Wo
        ffn = 3 * d * self.ffn_hidden_size  # W1, W3, W2
        embedding = head = self.vocab_size * d
        non_embedding = self.n_layer * (attention + ffn)
        return {
            "total": embedding + head + non_embedding,
            "embedding": embedding,
            "head": head,
            "non_embedding": non_embedding,
        }

    def describe(self):
        """One line: shape and parameter counts."""
        c = self.parameter_counts()
        return (
            f"n_layer={self.n_layer} d_model={self.d_model} n_head={self.n_head} n_kv_head={self.n_kv_head} "
            f"head_dim={self.head_dim} ffn={self.ffn_hidden_size} vocab={self.vocab_size}: "
            f"{c['total']:,} parameters ({c['non_embedding']:,} non-embedding, "
            f"{c['embedding']:,} embedding, {c['head']:,} head)"
        )


def preset_table():
    """A markdown table of every preset with its exact parameter counts."""
    rows = [
        "| preset | n_layer | d_model | n_head | n_kv_head | head_dim | ffn | vocab | total | non-embedding |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in PRESETS:
        cfg = NormGPTConfig(**PRESETS[name])
        c = cfg.parameter_counts()
        rows.append(
            f"| {name} | {cfg.n_layer} | {cfg.d_model} | {cfg.n_head} | {cfg.n_kv_head} | {cfg.head_dim} | "
            f"{cfg.ffn_hidden_size} | {cfg.vocab_size} | {c['total']:,} | {c['non_embedding']:,} |"
        )
    return "\n".join(rows)

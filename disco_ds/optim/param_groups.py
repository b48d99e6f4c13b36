"""Split a model's parameters into Scion's layer groups: embedding, hidden, output, vector.

Each role gets its geometry and its learning rate. The paper's finding (SPEC 3) is that the
input : hidden : output learning rates are best at about 1 : 1/8 : 1, hence ``lr_ratios``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from disco_ds.distributed import logical_shape
from disco_ds.optim.norms import NORMS

__all__ = ["ROLES", "DEFAULT_ROLE_NORMS", "EMBEDDING_NAME_PATTERN", "OUTPUT_NAME_PATTERN", "scion_param_groups", "classify_parameters"]

ROLES: tuple[str, ...] = ("embedding", "hidden", "output", "vector")

DEFAULT_ROLE_NORMS: dict[str, str] = {
    "embedding": "token_rms",
    "hidden": "spectral",
    "output": "row_norm",
    "vector": "rms",
}
"""Geometry per role (SPEC 1.2). In the hidden role, convolution kernels use ``conv_spectral``
and GPT-2-style ``Conv1D`` weights (stored ``[d_in, d_out]``) use ``spectral_transposed``."""

EMBEDDING_NAME_PATTERN = r"(^|\.)(wte|tok_embeddings|embed_tokens|word_embeddings|token_embedding)\.weight$"
"""Parameter names taken as the token embedding when the model has no ``get_input_embeddings``."""

OUTPUT_NAME_PATTERN = r"(^|\.)(lm_head|output|embed_out|head)\.weight$"
"""Parameter names taken as the output head when the model has no ``get_output_embeddings``."""

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_transposed_linear(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: a linear layer whose weight is stored [d_in, d_out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _hf_embedding(model: nn.Module, getter: str) -> torch.Tensor | None:
    """``model.get_input_embeddings().weight`` (or output); None if the model lacks it."""
    fn = getattr(model, getter, None)
    if fn is None:
        return None
    try:
        module = fn()
    except (NotImplementedError, AttributeError):
        return None
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def classify_parameters(
    model: nn.Module,
    roles: Mapping[str, str] | None = None,
    tied_role: str = "output",
) -> dict[str, tuple[str, torch.Tensor]]:
    """Map every trainable parameter name to ``(role, parameter)``.

    Order of precedence: ``roles`` (exact names or regular expressions matched in full), then
    ``get_input_embeddings()`` / ``get_output_embeddings()``, then the name patterns
    ``EMBEDDING_NAME_PATTERN`` / ``OUTPUT_NAME_PATTERN``, then the module: other ``nn.Embedding``
    tables (positions) are embeddings; then the shape: 2-D and conv kernels are hidden, 0/1-D are
    vectors. A tied embedding/head (one tensor) gets ``tied_role``.

    Raises:
        ValueError: for a parameter no rule classifies (e.g. a 3-D tensor outside a conv), naming it.
    """
    roles = dict(roles or {})
    for name, role in roles.items():
        if role not in ROLES:
            raise ValueError(f"roles[{name!r}] = {role!r} is not a role; accepted values: {list(ROLES)}")
    if tied_role not in ROLES:
        raise ValueError(f"tied_role={tied_role!r} is not a role; accepted values: {list(ROLES)}")

    embedding = _hf_embedding(model, "get_input_embeddings")
    output = _hf_embedding(model, "get_output_embeddings")
    conv_params = {id(m.weight) for m in model.modules() if isinstance(m, _CONV_TYPES)}
    table_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = _explicit_role(name, roles)
        if role is None:
            is_embedding = p is embedding if embedding is not None else re.search(EMBEDDING_NAME_PATTERN, name)
            is_output = p is output if output is not None else re.search(OUTPUT_NAME_PATTERN, name)
            if is_embedding and is_output:
                role = tied_role
            elif is_embedding or id(p) in table_params:
                role = "embedding"
            elif is_output:
                role = "output"
            else:
                ndim = len(logical_shape(p))
                if ndim == 2 or (ndim >= 3 and id(p) in conv_params):
                    role = "hidden"
                elif ndim <= 1:
                    role = "vector"
                else:
                    raise ValueError(
                        f"cannot classify parameter {name!r} of shape {logical_shape(p)} for Scion: it is not 2-D, "
                        f"not a conv kernel and not a vector. Pass roles={{{name!r}: ROLE}} with ROLE in {list(ROLES)}"
                    )
        out[name] = (role, p)
    return out


def _explicit_role(name: str, roles: Mapping[str, str]) -> str | None:
    if name in roles:
        return roles[name]
    for pattern, role in roles.items():
        if re.fullmatch(pattern, name):
            return role
    return None


def scion_param_groups(
    model: nn.Module,
    lr: float,
    lr_ratios: Sequence[float] = (1.0, 1.0 / 8, 1.0),
    *,
    vector_lr_ratio: float | None = None,
    momentum: float = 0.1,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    scale: float = 1.0,
    norms: Mapping[str, str] | None = None,
    roles: Mapping[str, str] | None = None,
    tied_role: str = "output",
    ns_steps: int = 5,
    ns_method: str = "quintic",
    ns_gram: bool = True,
) -> list[dict[str, Any]]:
    """Param groups for :class:`disco_ds.Scion`, one per (role, geometry) that has parameters.

    Args:
        model: any ``nn.Module``; Hugging Face models are classified through
            ``get_input_embeddings()`` / ``get_output_embeddings()``.
        lr: the base learning rate η.
        lr_ratios: ``(embedding, hidden, output)`` multipliers of ``lr``; the paper's 1 : 1/8 : 1.
        vector_lr_ratio: multiplier for 0/1-D parameters; defaults to the hidden ratio, since
            gains and biases live inside the hidden blocks.
        momentum, nesterov, weight_decay, scale, ns_steps, ns_method, ns_gram: Scion group keys, the same
            for every group.
        norms: per-role geometry overrides, e.g. ``{"output": "sign"}`` (defaults:
            ``DEFAULT_ROLE_NORMS``).
        roles: explicit ``{name or regex: role}`` for parameters the rules would misclassify.
        tied_role: role of a tied embedding/head weight.

    Returns:
        A list of dicts with ``params``, ``param_names``, ``role``, ``norm``, ``lr`` and the Scion
        keys. No group is empty.
    """
    if len(lr_ratios) != 3:
        raise ValueError(f"lr_ratios must be (embedding, hidden, output), got {tuple(lr_ratios)}")
    norms = {**DEFAULT_ROLE_NORMS, **(norms or {})}
    for role, norm in norms.items():
        if role not in ROLES:
            raise ValueError(f"norms[{role!r}]: unknown role; accepted values: {list(ROLES)}")
        if norm not in NORMS:
            raise ValueError(f"norms[{role!r}] = {norm!r}: unknown norm; accepted values: {sorted(NORMS)}")
    ratio = {
        "embedding": lr_ratios[0],
        "hidden": lr_ratios[1],
        "output": lr_ratios[2],
        "vector": lr_ratios[1] if vector_lr_ratio is None else vector_lr_ratio,
    }

    transposed = {id(m.weight) for m in model.modules() if _is_transposed_linear(m)}
    buckets: dict[tuple[str, str], dict[str, Any]] = {}
    for name, (role, p) in classify_parameters(model, roles, tied_role).items():
        norm = norms[role]
        if role == "hidden" and norm == DEFAULT_ROLE_NORMS["hidden"]:
            if len(logical_shape(p)) >= 3:
                norm = "conv_spectral"
            elif id(p) in transposed:
                norm = "spectral_transposed"
        group = buckets.setdefault(
            (role, norm),
            {
                "params": [],
                "param_names": [],
                "role": role,
                "norm": norm,
                "lr": lr * ratio[role],
                "momentum": momentum,
                "nesterov": nesterov,
                "weight_decay": weight_decay,
                "scale": scale,
                "ns_steps": ns_steps,
                "ns_method": ns_method,
                "ns_gram": ns_gram,
            },
        )
        group["params"].append(p)
        group["param_names"].append(name)
    order = {role: i for i, role in enumerate(ROLES)}
    return sorted(buckets.values(), key=lambda g: (order[g["role"]], g["norm"]))

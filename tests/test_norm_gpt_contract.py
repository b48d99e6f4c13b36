"""NormGPT against the Hugging Face model contract, on whichever transformers is installed.

The suite runs on the tested version (constraints.txt), and `make test-oldest` / `make test-latest`
run it again on transformers 4.57 and on the newest release: checkpoints are loaded as remote code
into whatever a user has, so every generation mode, mask and output option must agree everywhere.
Oracles: the model without a cache, each row or document run alone, SDPA versus eager attention,
the eager module versus its compiled and exported graphs.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from disco_ds.models.norm_gpt import NormGPTConfig, NormGPTForCausalLM, NormGPTModel  # noqa: E402
from disco_ds.models.norm_gpt import modeling_norm_gpt  # noqa: E402

VOCAB = NormGPTConfig.from_preset("tiny").vocab_size
GREEDY = dict(do_sample=False, pad_token_id=0)
# The name this transformers uses for the cache, in generate()'s arguments and in outputs.
CACHE = modeling_norm_gpt._CACHE_FIELD


def make_model(seed=0, attn_implementation=None, **overrides):
    torch.manual_seed(seed)
    config = NormGPTConfig.from_preset("tiny", **overrides)
    if attn_implementation is None:
        return NormGPTForCausalLM(config).eval()
    return NormGPTForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


def random_ids(batch, length, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture
def no_ignored_kwargs():
    """Fails the test if the model warned about a keyword argument it does not know: a renamed
    argument of this transformers version would otherwise be dropped in silence."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    unknown = [str(w.message) for w in caught if "NormGPT ignores" in str(w.message)]
    assert unknown == []


def left_padded(rows, pad_id=0):
    """A left-padded batch of 1-row id tensors and its attention mask."""
    width = max(r.shape[1] for r in rows)
    batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, width - r.shape[1] :] = r[0]
        mask[i, width - r.shape[1] :] = 1
    return batch, mask


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_cached_greedy_equals_uncached_token_for_token(n_kv_head, no_ignored_kwargs):
    m = make_model(n_kv_head=n_kv_head)
    prompt = random_ids(2, 7)
    with_cache = m.generate(prompt, max_new_tokens=16, use_cache=True, **GREEDY)
    without = m.generate(prompt, max_new_tokens=16, use_cache=False, **GREEDY)
    assert with_cache.shape == (2, 23)
    assert torch.equal(with_cache, without)


def test_left_padded_batch_generates_each_row_alone(model, no_ignored_kwargs):
    rows = [random_ids(1, 9, seed=5), random_ids(1, 3, seed=6), random_ids(1, 6, seed=7)]
    batch, mask = left_padded(rows)
    together = model.generate(batch, attention_mask=mask, max_new_tokens=10, **GREEDY)
    for i, row in enumerate(rows):
        alone = model.generate(row, max_new_tokens=10, **GREEDY)
        assert torch.equal(together[i, batch.shape[1] :], alone[0, row.shape[1] :]), f"row {i}"


def test_generation_continues_from_a_returned_cache(model, no_ignored_kwargs):
    prompt = random_ids(2, 6)
    first = model.generate(prompt, max_new_tokens=5, return_dict_in_generate=True, **GREEDY)
    cache = first[CACHE]
    assert cache is not None and cache.get_seq_length() == 10  # every token but the last generated one
    continued = model.generate(first.sequences, max_new_tokens=6, **{CACHE: cache}, **GREEDY)
    at_once = model.generate(prompt, max_new_tokens=11, use_cache=False, **GREEDY)
    assert torch.equal(continued, at_once)


def test_beam_search_with_and_without_cache(model, no_ignored_kwargs):
    prompt = random_ids(2, 5)
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, **GREEDY)
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_assisted_decoding_equals_greedy(model, no_ignored_kwargs):
    # A different draft model proposes tokens; the target verifies several at once with its cache
    # (queries after a cache, then the cache cropped back): greedy output must not change.
    draft = make_model(seed=11)
    prompt = random_ids(1, 6)
    assisted = model.generate(prompt, assistant_model=draft, max_new_tokens=12, **GREEDY)
    assert torch.equal(assisted, model.generate(prompt, max_new_tokens=12, use_cache=False, **GREEDY))


def test_static_cache_generation(model, no_ignored_kwargs):
    from transformers import StaticCache

    prompt = random_ids(2, 6)
    static = model.generate(
        prompt, max_new_tokens=9, cache_implementation="static", return_dict_in_generate=True, **GREEDY
    )
    assert isinstance(static[CACHE], StaticCache)  # really used, not replaced by a dynamic cache
    assert torch.equal(static.sequences, model.generate(prompt, max_new_tokens=9, use_cache=False, **GREEDY))
    # With padding, the static cache's unfilled slots and the padded keys are masked together.
    rows = [random_ids(1, 7, seed=5), random_ids(1, 4, seed=6)]
    batch, mask = left_padded(rows)
    padded = model.generate(batch, attention_mask=mask, max_new_tokens=6, cache_implementation="static", **GREEDY)
    for i, row in enumerate(rows):
        alone = model.generate(row, max_new_tokens=6, use_cache=False, **GREEDY)
        assert torch.equal(padded[i, batch.shape[1] :], alone[0, row.shape[1] :]), f"row {i}"


# ----------------------------------------------------------------------------- outputs


def test_hidden_states_are_the_embeddings_every_block_and_the_final_output(model):
    ids = random_ids(2, 9)
    block_outputs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: block_outputs.append(out[0])) for layer in model.model.layers]
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    hidden = out.hidden_states
    assert len(hidden) == model.config.n_layer + 1
    assert torch.equal(hidden[0], model.model.embed_tokens(ids))
    for i in range(1, model.config.n_layer):
        assert torch.equal(hidden[i], block_outputs[i - 1])
    base = model.model(ids, output_hidden_states=True)
    assert torch.equal(hidden[-1], base.last_hidden_state)
    assert model(ids).hidden_states is None
    model.config.output_hidden_states = True
    try:
        assert len(model(ids).hidden_states) == model.config.n_layer + 1
    finally:
        model.config.output_hidden_states = False


@pytest.mark.parametrize("where", ["argument", "config"])
def test_return_dict_false_gives_tuples(model, where):
    ids = random_ids(1, 5)
    with torch.no_grad():
        reference = model(ids, labels=ids)
        if where == "argument":
            lm, base = model(ids, labels=ids, return_dict=False), model.model(ids, return_dict=False)
        else:
            model.config.return_dict = False
            try:
                lm, base = model(ids, labels=ids), model.model(ids)
            finally:
                model.config.return_dict = True
    assert isinstance(lm, tuple) and isinstance(base, tuple)
    assert torch.equal(lm[0], reference.loss) and torch.equal(lm[1], reference.logits)
    assert torch.equal(base[0], model.model(ids).last_hidden_state)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_eager_attention_matches_sdpa_and_returns_weights(n_kv_head):
    sdpa, eager = make_model(n_kv_head=n_kv_head), make_model(n_kv_head=n_kv_head, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    rows = [random_ids(1, 8, seed=2), random_ids(1, 5, seed=3)]
    batch, mask = left_padded(rows)
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            a, b = sdpa(batch, **kwargs), eager(batch, output_attentions=True, **kwargs)
            torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
            weights = b.attentions
            assert len(weights) == eager.config.n_layer
            assert weights[0].shape == (2, eager.config.n_head, 8, 8)
            torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, eager.config.n_head, 8))
            assert torch.all(weights[0].triu(diagonal=1) == 0)  # causal
        # Padded keys get no weight from real queries.
        assert torch.all(weights[0][1, :, 3:, :3] == 0)
        # SDPA asked for weights computes them the eager way for that call.
        torch.testing.assert_close(sdpa(batch, output_attentions=True).attentions[1], eager(batch, output_attentions=True).attentions[1])


# ----------------------------------------------------------------------------- masks


def test_packed_row_equals_its_documents_alone(model):
    from transformers import DataCollatorWithFlattening

    docs = [random_ids(1, 5, seed=20), random_ids(1, 7, seed=21), random_ids(1, 4, seed=22)]
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d[0].tolist()} for d in docs])
    assert packed["position_ids"][0].tolist() == [*range(5), *range(7), *range(4)]
    with torch.no_grad():
        alone = torch.cat([model(d).logits for d in docs], dim=1)
        for use_cache in (None, False):  # with a fresh cache (inference default) and without
            logits = model(packed["input_ids"], position_ids=packed["position_ids"], use_cache=use_cache).logits
            torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
        # The collator's labels mark each document's first token: the packed loss is the documents' loss.
        loss = model(**packed).loss
    token_losses = [model(d, labels=d).loss * (d.shape[1] - 1) for d in docs]
    torch.testing.assert_close(loss, sum(token_losses) / sum(d.shape[1] - 1 for d in docs), atol=1e-5, rtol=0)


def test_compiles_fullgraph_and_exports_with_an_attention_mask(model):
    rows = [random_ids(1, 10, seed=2), random_ids(1, 6, seed=3)]
    batch, mask = left_padded(rows)
    with torch.no_grad():
        expected = model(batch, attention_mask=mask, use_cache=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(batch, attention_mask=mask, use_cache=False).logits, expected, atol=1e-5, rtol=0)
        exported = torch.export.export(
            model, args=(batch,), kwargs={"attention_mask": mask, "use_cache": False}, strict=False
        )
        torch.testing.assert_close(exported.module()(batch, attention_mask=mask, use_cache=False).logits, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- keyword arguments


def test_unknown_keywords_warn_once_by_name_and_listed_ones_are_silent(model):
    ids = random_ids(1, 4)
    modeling_norm_gpt._warned_kwargs.difference_update({"made_up_argument", "num_items_in_batch"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(ids, made_up_argument=1)
            model(ids, made_up_argument=2)
            model(ids, cache_position=torch.arange(4))  # listed: transformers 4.x generate() sends it
            NormGPTModel.forward(model.model, ids, num_items_in_batch=3)  # a loss argument reaching the base model
    messages = [str(w.message) for w in caught if "NormGPT ignores" in str(w.message)]
    assert messages.count("NormGPT ignores the keyword argument 'made_up_argument'") == 1
    assert not any("cache_position" in m for m in messages)
    assert any("num_items_in_batch" in m for m in messages)


def test_cache_is_accepted_under_both_names(model):
    from transformers import DynamicCache

    ids = random_ids(1, 8)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for name in ("cache", "past_key_values"):
            cache = DynamicCache()
            model(ids[:, :5], use_cache=True, **{name: cache})
            out = model(ids[:, 5:], use_cache=True, **{name: cache})
            assert out[CACHE] is cache
            torch.testing.assert_close(out.logits, full[:, 5:], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="not both"):
            model(ids, cache=DynamicCache(), past_key_values=DynamicCache())

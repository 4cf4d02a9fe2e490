"""Sampling: each filter agrees with Hugging Face's logits processor of the same name, and the
settings are validated with messages that name the field."""

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from pocketlm.infer import sampling
from pocketlm.infer.sampling import (SamplingError, SamplingParams, apply_repetition_penalty, filter_logits,
                                     make_generator, sample_token)

V = 200


def rows(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(V, generator=g) * s for s in torch.linspace(0.5, 4.0, n).tolist()]


def kept(logits):
    return torch.isfinite(logits)


@pytest.mark.parametrize("setting,value,warper", [
    ("top_k", 1, TopKLogitsWarper), ("top_k", 5, TopKLogitsWarper), ("top_k", 50, TopKLogitsWarper),
    ("top_p", 0.1, TopPLogitsWarper), ("top_p", 0.5, TopPLogitsWarper), ("top_p", 0.9, TopPLogitsWarper),
    ("top_p", 0.99, TopPLogitsWarper), ("min_p", 0.01, MinPLogitsWarper), ("min_p", 0.1, MinPLogitsWarper),
    ("min_p", 0.5, MinPLogitsWarper)])
def test_filters_keep_the_same_tokens_as_transformers(setting, value, warper):
    for x in rows():
        ours = filter_logits(x.clone(), **{setting: value})
        ref = warper(value)(None, x.clone()[None])[0]
        assert torch.equal(kept(ours), kept(ref))
        if setting == "top_k":
            assert kept(ours).sum() == value


def test_nucleus_on_a_large_vocabulary_matches_transformers_inside_and_past_the_first_ranking():
    """filter_logits ranks NUCLEUS_FIRST tokens first and sorts the whole row only when the nucleus is
    longer: peaked rows end inside that ranking, flat ones past it; both keep transformers' tokens."""
    g = torch.Generator().manual_seed(1)
    sizes = []
    for scale in (0.2, 0.5, 3.0, 6.0):  # flat (nucleus of hundreds of tokens) to peaked (a few)
        x = torch.randn(4 * sampling.NUCLEUS_FIRST, generator=g) * scale
        ours = filter_logits(x.clone(), top_p=0.9)
        ref = TopPLogitsWarper(0.9)(None, x.clone()[None])[0]
        assert torch.equal(kept(ours), kept(ref)) and torch.equal(ours[kept(ours)], x[kept(ours)])
        sizes.append(int(kept(ours).sum()))
    assert min(sizes) < sampling.NUCLEUS_FIRST < max(sizes)  # (both branches ran)


def test_repetition_penalty_matches_transformers():
    x = rows(1)[0]
    seen_ids = torch.tensor([[3, 7, 7, 150, 199]])
    seen = torch.zeros(V, dtype=torch.bool)
    seen[seen_ids[0]] = True
    ours = apply_repetition_penalty(x.clone(), seen, 1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, x.clone()[None])[0]
    torch.testing.assert_close(ours, ref)
    assert torch.equal(ours[~seen], x[~seen])


def test_nucleus_keeps_exactly_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert kept(filter_logits(logits, top_p=0.75)).tolist() == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.5)).tolist() == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.96)).tolist() == [True, True, True, True]
    assert kept(filter_logits(logits, min_p=0.2)).tolist() == [True, True, True, False]  # 0.05 < 0.2 * 0.5
    # found by the server fuzz test: a top_p that rounds to 0 in float32 dropped every token (NaN softmax)
    assert kept(filter_logits(logits, top_p=1e-146)).tolist() == [True, False, False, False]


def test_greedy_and_top_k_1_are_argmax():
    for x in rows():
        assert sample_token(x, SamplingParams(temperature=0)) == int(x.argmax())
        assert sample_token(x, SamplingParams(temperature=1.5, top_k=1), make_generator(0)) == int(x.argmax())


def test_a_vanishing_temperature_is_greedy_not_nan():
    """Found by the server fuzz test: logits / 5e-324 overflowed to inf and the softmax to nan."""
    for x in rows(3):
        assert sample_token(x, SamplingParams(temperature=5e-324), make_generator(0)) == int(x.argmax())


def test_samples_stay_inside_the_filtered_set_and_follow_the_distribution():
    x = rows(1, seed=3)[0]
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.9)
    allowed = set(torch.nonzero(kept(filter_logits(x / 0.7, top_k=10, top_p=0.9))).flatten().tolist())
    g = make_generator(1)
    draws = [sample_token(x, params, g) for _ in range(2000)]
    assert set(draws) <= allowed and len(set(draws)) > 1
    # the most likely token is drawn about as often as its renormalised probability says
    p = (filter_logits(x / 0.7, top_k=10, top_p=0.9)).softmax(-1)
    top = int(p.argmax())
    assert abs(draws.count(top) / len(draws) - float(p[top])) < 0.05


def test_seed_makes_sampling_reproducible():
    x = rows(1)[0]
    params = SamplingParams(temperature=1.0, seed=42)
    a = [sample_token(x, params, g) for g in [make_generator(42)] for _ in range(50)]
    b = [sample_token(x, params, g) for g in [make_generator(42)] for _ in range(50)]
    c = [sample_token(x, params, g) for g in [make_generator(43)] for _ in range(50)]
    assert a == b and a != c


@pytest.mark.parametrize("field,value,expected", [
    ("temperature", -0.1, "temperature"), ("temperature", float("nan"), "temperature"), ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"), ("top_k", -1, "top_k"), ("min_p", 2.0, "min_p"), ("repetition_penalty", 0.0, "repetition_penalty"),
    ("repetition_penalty", 1e-146, "repetition_penalty"),  # would turn a logit into inf, then NaN probabilities
    ("max_tokens", 0, "max_tokens"), ("max_tokens", 2.5, "max_tokens"), ("seed", "x", "seed"), ("stop", [""], "stop"),
])
def test_bad_settings_name_the_field(field, value, expected):
    with pytest.raises(SamplingError, match=expected):
        SamplingParams(**{field: value})

"""Per-row sampling and logprob conventions, against transformers' own logits warpers."""

from __future__ import annotations

import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from rlhf.generation.sampling import SamplingParams, row_generator, sample_rows, truncate_logits


def test_truncation_matches_the_transformers_warpers():
    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1, 50) * 3
        for k, p in [(5, 1.0), (0, 0.8), (10, 0.5), (0, 0.999), (1, 1.0)]:
            expected = logits
            if k:
                expected = TopKLogitsWarper(k)(None, expected)
            if p < 1:
                expected = TopPLogitsWarper(p)(None, expected)
            assert torch.equal(torch.isinf(truncate_logits(logits[0], k, p)), torch.isinf(expected[0]))


def test_logprob_modes():
    torch.manual_seed(1)
    logits = torch.randn(3, 40) * 2
    logits[1] = logits[0]
    temperature = SamplingParams(temperature=0.5, top_k=3, seed=1, logprobs_mode="temperature")
    sampling = SamplingParams(temperature=0.5, top_k=3, seed=1, logprobs_mode="sampling")
    greedy = SamplingParams(temperature=0.0, logprobs_mode="sampling")
    gens = [row_generator(1, 0), row_generator(1, 0), None]
    tokens, logprobs = sample_rows(logits, [temperature, sampling, greedy], gens)
    assert tokens[0] == tokens[1]  # same seed, same distribution
    assert tokens[0] in torch.topk(logits[0] / 0.5, 3).indices.tolist()
    assert abs(logprobs[0] - torch.log_softmax(logits[0] / 0.5, -1)[tokens[0]]) < 1e-6
    top = torch.topk(logits[1] / 0.5, 3).values
    assert abs(logprobs[1] - (logits[1, tokens[1]] / 0.5 - torch.logsumexp(top, 0))) < 1e-5
    assert tokens[2] == int(logits[2].argmax())
    assert abs(logprobs[2] - torch.log_softmax(logits[2], -1)[tokens[2]]) < 1e-6


def test_a_seeded_row_does_not_depend_on_its_neighbours():
    torch.manual_seed(2)
    logits = torch.randn(4, 30)
    params = [SamplingParams(temperature=1.0, seed=s) for s in (7, 8, 9, 7)]
    tokens = [sample_rows(logits[:1], params[:1], [row_generator(7, 0)])[0][0] for _ in range(3)]
    batch = []
    for _ in range(3):
        gens = [row_generator(p.seed, 0) for p in params]
        batch.append(sample_rows(logits, params, gens)[0][0])
    assert tokens == batch


def test_every_prompt_and_sample_of_a_seeded_request_draws_its_own_numbers():
    from rlhf.generation.sampling import sample_seed

    seeds = {sample_seed(7, i, j) for i in range(4) for j in range(4)}
    assert len(seeds) == 16  # no two rows of one request share a generator state
    assert sample_seed(7, 2, 3) == sample_seed(7, 2, 3)  # the same request draws the same numbers again
    draws = [torch.rand(4, generator=row_generator(7, 0, i)) for i in range(2)]
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(torch.rand(4, generator=row_generator(7, 0, 1)), draws[1])

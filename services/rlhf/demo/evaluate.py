"""How the demo measures alignment on held-out prompts: plain functions over lists of numbers and texts.

* gold mean with a bootstrap confidence interval (:func:`bootstrap_mean_ci`);
* pairwise win rate of one policy over another judged by gold, ties counting one half, with a paired
  bootstrap interval (:func:`win_rate`, :func:`win_rate_ci`);
* KL(policy || reference) per response, estimated from the policy's own samples as the sum over response tokens
  of log pi(y_t) - log ref(y_t) (:func:`kl_per_response`; :func:`reference_logprobs` computes the reference's
  token logprobs with the same temperature convention as the generation service);
* distinct-n over all responses (:func:`distinct_n`) and response lengths, so reward hacking (collapse to one
  phrase, padding) shows up next to the gold score.

The end of the module measures through the services: :func:`evaluate_policies` samples base, SFT and PPO
from the generation service and scores them with the reward service; :func:`eval_comparisons` and
:func:`score_comparisons` give the reward model's scores of the held-out comparisons.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf.core.chat import encode_prompt
from rlhf.core.models import causal_lm_logits, load_causal_lm, load_tokenizer
from rlhf.demo.config import DemoConfig
from rlhf.demo.sampling import Generated, sample
from rlhf.demo.task import gold_score
from rlhf.feedback import records as rec
from rlhf.feedback.client import FeedbackClient
from rlhf.generation.client import PolicyClient
from rlhf.reward.client import RewardClient
from rlhf.v1 import feedback_pb2

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return float(sum(values) / len(values))


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 1]) of an already sorted list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_mean_ci(
    values: Sequence[float], *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and its percentile-bootstrap interval."""
    values = [float(v) for v in values]
    m = mean(values)
    rng = random.Random(seed)
    n = len(values)
    boots = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    alpha = (1.0 - confidence) / 2
    return m, _percentile(boots, alpha), _percentile(boots, 1.0 - alpha)


def _groups(values: Sequence[float], group: int) -> list[Sequence[float]]:
    """Consecutive runs of ``group`` values (the samples of one prompt)."""
    if group < 1 or len(values) % group:
        raise ValueError(f"{len(values)} values do not split into groups of {group}")
    return [values[i : i + group] for i in range(0, len(values), group)]


def group_means(values: Sequence[float], group: int = 1) -> list[float]:
    """Means of consecutive runs of ``group`` values (the samples of one prompt): the units a bootstrap
    resamples, since samples of one prompt are not independent of each other."""
    return [mean(g) for g in _groups(values, group)]


def win(x: float, y: float) -> float:
    """1 when x beats y, one half for a tie, 0 otherwise."""
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _check_paired(a: Sequence[float], b: Sequence[float]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("win rate of no pairs")


def _win_values(a: Sequence[float], b: Sequence[float], group: int = 1) -> list[float]:
    """Per prompt: the share of (a sample, b sample) pairs of that prompt that a wins (ties one half); ``a``
    and ``b`` hold ``group`` consecutive samples per prompt, and every a sample meets every b sample."""
    _check_paired(a, b)
    return [
        mean([win(x, y) for x in xs for y in ys])
        for xs, ys in zip(_groups(a, group), _groups(b, group), strict=True)
    ]


def win_rate(a: Sequence[float], b: Sequence[float], group: int = 1) -> float:
    """Share of pairs where a wins, ties counting one half: (a[i], b[i]) with ``group`` 1; with ``group`` k
    samples per prompt, every a sample against every b sample of the same prompt, each prompt weighing the same."""
    return mean(_win_values(a, b, group))


def win_rate_ci(
    a: Sequence[float],
    b: Sequence[float],
    *,
    group: int = 1,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(win rate of a over b, low, high) with a paired bootstrap over the prompts (see :func:`win_rate`)."""
    return bootstrap_mean_ci(_win_values(a, b, group), n_boot=n_boot, confidence=confidence, seed=seed)


def win_rate_by(
    a: Sequence[float], b: Sequence[float], b_labels: Sequence[str], group: int = 1
) -> dict[str, dict]:
    """The pairs of :func:`win_rate` split by a label of the b sample: {label: {"rate", "pairs"}}, the share
    of that label's (a sample, b sample) pairs a wins (ties one half), pooled over prompts."""
    if len(b_labels) != len(b):
        raise ValueError(f"{len(b_labels)} labels for {len(b)} b scores")
    _check_paired(a, b)
    wins: dict[str, list[float]] = {}
    for xs, ys, labels in zip(_groups(a, group), _groups(b, group), _groups(b_labels, group), strict=True):
        for y, label in zip(ys, labels, strict=True):
            wins.setdefault(label, []).extend(win(x, y) for x in xs)
    return {label: {"rate": mean(v), "pairs": len(v)} for label, v in sorted(wins.items())}


def kl_per_response(
    policy_logprobs: Sequence[Sequence[float]], reference_logprobs: Sequence[Sequence[float]]
) -> list[float]:
    """Per response: sum_t log pi(y_t) - log ref(y_t) over its tokens (an unbiased sample of KL(pi || ref) when
    y was drawn from pi)."""
    if len(policy_logprobs) != len(reference_logprobs):
        raise ValueError("policy and reference logprobs cover different numbers of responses")
    out = []
    for i, (lp, lr) in enumerate(zip(policy_logprobs, reference_logprobs, strict=True)):
        if len(lp) != len(lr):
            raise ValueError(f"response {i}: {len(lp)} policy logprobs vs {len(lr)} reference logprobs")
        out.append(float(sum(p - r for p, r in zip(lp, lr, strict=True))))
    return out


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over every text (word and punctuation tokens, lower-cased); 0 if none."""
    total, seen = 0, set()
    for text in texts:
        grams = ngrams([t.lower() for t in _TOKEN.findall(text)], n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def word_count(text: str) -> int:
    return len(re.findall(r"\w+", text))


def reference_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    batch_size: int = 8,
    pad_id: int = 0,
) -> list[list[float]]:
    """Token logprobs of each response under ``model`` (a causal LM): log-softmax(logits / temperature) at each
    response token, the generation service's LOGPROBS_MODE_TEMPERATURE convention. Right padding."""
    out: list[list[float]] = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = [
            (list(p), list(r))
            for p, r in zip(
                prompt_ids[start : start + batch_size], response_ids[start : start + batch_size], strict=True
            )
        ]
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            seq = p + r
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        with torch.no_grad():
            logits = causal_lm_logits(model, ids, mask).float() / temperature
            logp = torch.log_softmax(logits, dim=-1)
        for i, (p, r) in enumerate(rows):
            if not r:
                out.append([])
                continue
            positions = torch.arange(len(p) - 1, len(p) + len(r) - 1)
            targets = torch.tensor(r)
            out.append(logp[i, positions, targets].tolist())
    return out


@dataclass
class PolicyEval:
    """What the demo reports for one policy on the eval prompts (one sample per prompt)."""

    name: str
    gold: list[float]
    words: list[int]
    tokens: list[int]
    finished: list[bool]
    texts: list[str]
    kl: list[float] | None = None
    rm_scores: list[float] | None = None
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    name: str,
    texts: Sequence[str],
    gold: Sequence[float],
    tokens: Sequence[int],
    finished: Sequence[bool],
    *,
    kl: Sequence[float] | None = None,
    rm_scores: Sequence[float] | None = None,
    seed: int = 0,
    group: int = 1,
) -> PolicyEval:
    """A :class:`PolicyEval` with its summary numbers (gold mean and 95% CI, lengths, distinct-n, KL). With
    ``group`` consecutive samples per prompt the CIs resample prompts (the means are over all samples)."""
    g_mean, g_lo, g_hi = bootstrap_mean_ci(group_means(gold, group), seed=seed)
    words = [word_count(t) for t in texts]
    summary = {
        "n": len(texts),
        "samples_per_prompt": group,
        "gold_mean": g_mean,
        "gold_ci_low": g_lo,
        "gold_ci_high": g_hi,
        "mean_words": mean(words),
        "mean_tokens": mean(list(tokens)),
        "finished_rate": mean([1.0 if f else 0.0 for f in finished]),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
    }
    if kl is not None:
        k_mean, k_lo, k_hi = bootstrap_mean_ci(group_means(kl, group), seed=seed)
        summary.update(kl_mean=k_mean, kl_ci_low=k_lo, kl_ci_high=k_hi)
    if rm_scores is not None:
        summary["rm_mean"] = mean(list(rm_scores))
    return PolicyEval(
        name=name,
        gold=list(gold),
        words=words,
        tokens=list(tokens),
        finished=list(finished),
        texts=list(texts),
        kl=list(kl) if kl is not None else None,
        rm_scores=list(rm_scores) if rm_scores is not None else None,
        summary=summary,
    )


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (0 when either side is constant)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("pearson needs two equally long sequences of at least 2 values")
    mx, my = mean(x), mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return 0.0
    return float(sxy / (sxx * syy) ** 0.5)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    return pearson(ranks(x), ranks(y))


# ---- evaluating through the services ------------------------------------------------------------------------


def eval_comparisons(store: FeedbackClient, snapshot: str) -> list[feedback_pb2.Comparison]:
    """The snapshot's held-out two-way comparisons of two different replies."""
    comparisons = [
        rec.exported_record(m) for m in store.export(snapshot=snapshot, split="eval", kinds=["comparison"])
    ]
    return [c for c in comparisons if len(c.responses) == 2 and c.responses[0].text != c.responses[1].text]


def score_comparisons(
    rm_client: RewardClient, comparisons: Sequence[feedback_pb2.Comparison]
) -> list[tuple[float, float]]:
    """The served reward model's scores of each comparison's two replies (a reply in several comparisons is
    scored once)."""
    items = []
    for c in comparisons:
        prompt = rec.prompt_value(c.prompt)
        items += [(prompt, c.responses[0].text), (prompt, c.responses[1].text)]
    distinct = list(dict.fromkeys(items))
    score_of = dict(zip(distinct, rm_client.score(distinct), strict=True))
    scores = [score_of[item] for item in items]
    return list(zip(scores[::2], scores[1::2], strict=True))


def _policy_eval(
    name: str,
    samples: Sequence[Generated],
    sample_prompts: Sequence[str],
    rm_client: RewardClient,
    kl: list[float] | None,
    *,
    seed: int,
    group: int,
) -> PolicyEval:
    texts = [s.text for s in samples]
    return summarize(
        name,
        texts,
        [gold_score(s.text, finished=s.finished) for s in samples],
        [len(s.token_ids) for s in samples],
        [s.finished for s in samples],
        kl=kl,
        rm_scores=rm_client.score(list(zip(sample_prompts, texts, strict=True))),
        seed=seed,
        group=group,
    )


def _comparison_figures(evals: dict[str, PolicyEval], prompts: int, k: int, seed: int) -> dict:
    """Win rates (PPO over SFT, SFT over base) and how the RM's scores follow gold over every sample."""
    ppo, sft, base = evals["PPO"], evals["SFT"], evals["base"]
    win, lo, hi = win_rate_ci(ppo.gold, sft.gold, group=k, seed=seed)
    sft_win, sft_lo, sft_hi = win_rate_ci(sft.gold, base.gold, group=k, seed=seed)
    all_gold = [g for e in evals.values() for g in e.gold]
    all_rm = [r for e in evals.values() for r in (e.rm_scores or [])]
    return {
        "win_rate": {
            "name": "PPO over SFT by gold",
            "rate": win,
            "low": lo,
            "high": hi,
            "n": prompts,
            "samples_per_prompt": k,
            # where the wins come from: against SFT replies that ended on their own vs. ones the length
            # limit cut off (the cut-off penalty alone decides most of the latter)
            "by_sft_reply": win_rate_by(
                ppo.gold, sft.gold, ["finished" if f else "cut_off" for f in sft.finished], group=k
            ),
        },
        "sft_win_rate": {"name": "SFT over base by gold", "rate": sft_win, "low": sft_lo, "high": sft_hi},
        "rm_vs_gold": {"spearman": spearman(all_gold, all_rm), "pearson": pearson(all_gold, all_rm)},
    }


def evaluate_policies(
    settings: DemoConfig,
    policy: PolicyClient,
    rm_client: RewardClient,
    prompts: list[str],
    models: dict[str, Path],
    *,
    reference: Path,
) -> dict:
    """``settings.eval_samples`` samples per eval prompt from each of ``models`` (base, SFT, PPO; loaded into
    the generation service in turn): gold, RM scores, lengths, distinct-n; KL to the reference (SFT) model per
    response, from token logprobs. Samples are kept prompt-major (the k samples of prompt i at i*k ... i*k+k-1)."""
    k = settings.eval_samples
    tokenizer = load_tokenizer(reference)
    ref_model = load_causal_lm(reference)
    prompt_ids = [ids for p in prompts for ids in [encode_prompt(tokenizer, p)] * k]
    sample_prompts = [p for p in prompts for _ in range(k)]
    evals: dict[str, PolicyEval] = {}
    version = int(policy.model_info().version or 0)
    # PPO's weights are the ones being served now: evaluate it first, then load the others.
    for name in ["PPO", *[n for n in models if n != "PPO"]]:
        if name != "PPO":
            version = policy.update_weights(version=version + 1, checkpoint_path=str(models[name]))
        groups = sample(settings, policy, prompts, n=k, seed_stream=7, desc=f"eval {name}")
        samples = [s for group in groups for s in group]
        kl = None
        if name != "SFT":
            ref_lp = reference_logprobs(
                ref_model,
                prompt_ids,
                [s.token_ids for s in samples],
                temperature=settings.temperature,
                pad_id=tokenizer.pad_token_id or 0,
            )
            kl = kl_per_response([s.logprobs for s in samples], ref_lp)
        evals[name] = _policy_eval(name, samples, sample_prompts, rm_client, kl, seed=settings.seed, group=k)
    ordered = {n: evals[n] for n in ("base", "SFT", "PPO") if n in evals}
    return {
        "evals": {n: e.to_dict() for n, e in ordered.items()},
        "eval_samples": k,
        **_comparison_figures(ordered, len(prompts), k, settings.seed),
    }

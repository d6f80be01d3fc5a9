"""`rlhf train ppo`: PPO from the SFT model, with the generation and reward services in the loop.

    run_ppo(cfg: PPOConfig) -> Path   # RUN_DIR/final, an HF folder the generation service loads

Models. The policy and the frozen reference both start from ``cfg.model`` (the SFT checkpoint; the reference
may be another folder, ``cfg.reference_model``). The value model is a **scalar value head on the policy**
(a linear layer on the policy's last hidden state, as TRL's ``AutoModelForCausalLMWithValueHead``): one
forward of the policy gives both the logprobs and the values, so no third 135M-parameter model is kept,
run or trained. Its weight starts at zero and its bias at the mean score of the first rollout, so the values
start on the reward's scale and the value loss does not pull on the shared backbone before the head has
learned anything.

One iteration (the loop of ``run_ppo`` reads like the algorithm)::

    sync       push the current weights to the generation service when it does not serve them yet
    generate   PolicyClient.generate(prompt token ids, temperature, max_new_tokens, logprobs_mode=temperature,
               min_policy_version=v); samples of any other version are refused
    score      RewardClient.score_detailed(prompt, response text) -> scores (normalized when the reward
               checkpoint carries its mean/std)
    reference  one forward of the frozen reference -> reference logprobs
    values     one forward of the policy -> logprobs (compared with the service's: the mismatch is a metric)
               and values. With one minibatch per epoch this forward *is* the first PPO forward (the policy
               has not moved yet), so it runs with gradients inside ``update`` and is not repeated. With RLOO
               and the service's logprobs reusable it is skipped: nothing needs values, the service's logprobs
               serve for the ratio and the KL, and entropy/mismatch are read off the first update forward.
    update     shaped rewards (score on the last token, -kl_coef * KL against the reference on every token,
               a penalty when no EOS) -> GAE -> whitened advantages -> num_ppo_epochs x num_mini_batches
               clipped PPO steps (policy + vf_coef * value loss, gradient clipping) -> adaptive KL coefficient
    then the job shell logs the metrics and checkpoints when due; the weights the update produced are pushed at
    the start of the next iteration (and once after the last one), so every checkpoint and every failure falls
    on a step boundary where the tracked state is consistent.

The old logprobs of the PPO ratio are the generation service's own logprobs when the samples came from the
trainer's current version (``reuse_generation_logprobs``), else the trainer's recompute.

Layers: the PPO math, rollout tensors, forwards and the learner are rlhf.rl (pure); talking to the services
is trainer/rollouts.py (generate, score, retries) and trainer/weight_sync.py (pushes); the job shell
(lifecycle, checkpoints, metrics, TrainerService) is trainer/job.py. This module wires them.

A service that stays down past the retry window ends the job with a clear message after a checkpoint
(rlhf.core.errors.ServiceDown); ``--resume`` continues from it and pushes the resumed weights first.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlhf.core import chat
from rlhf.core.errors import ServiceDown
from rlhf.core.files import atomic_folder
from rlhf.core.models import load_causal_lm, load_tokenizer, set_torch_threads
from rlhf.rl.forward import ValueHead, reference_logprobs
from rlhf.rl.learner import PPOLearner
from rlhf.rl.rollout import Prompt
from rlhf.trainer.config import PPOConfig
from rlhf.trainer.data import load_prompts
from rlhf.trainer.job import TrainJob
from rlhf.trainer.rollouts import calling, generate_rollout, make_clients, make_policy_client, score_rollout
from rlhf.trainer.weight_sync import PolicySync

log = logging.getLogger("rlhf.trainer.ppo")


@dataclass
class PromptSet:
    prompts: list[Prompt]
    token_ids: list[list[int]]


def load_prompt_set(cfg: PPOConfig, tokenizer) -> PromptSet:
    """The training prompts of the snapshot / JSONL file, tokenized once; prompts too long are left out."""
    splits = load_prompts(cfg, kinds=cfg.prompt_kinds)
    budget = cfg.max_length - cfg.response_length
    prompts, ids, dropped = [], [], 0
    for prompt in splits.train:
        encoded = chat.encode_prompt(tokenizer, prompt)
        if len(encoded) > budget:
            dropped += 1
            continue
        prompts.append(prompt)
        ids.append(encoded)
    if dropped:
        log.warning(
            "left out %d prompts longer than max_length - response_length = %d tokens", dropped, budget
        )
    if not prompts:
        raise ValueError("data: no training prompts (check snapshot / data_file and prompt_kinds)")
    return PromptSet(prompts, ids)


def iteration_prompts(n_prompts: int, per_iteration: int, iteration: int, seed: int) -> list[int]:
    """Indices of the prompts of ``iteration`` (0-based): a fresh permutation every pass over the prompts.

    A pure function of the iteration number, so a resumed run reads exactly the prompts of an uninterrupted one.
    """
    per_pass = n_prompts // per_iteration
    epoch, index = divmod(iteration, per_pass)
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n_prompts, generator=generator)
    return order[index * per_iteration : (index + 1) * per_iteration].tolist()


# ---------------------------------------------------------------------------------------------------------
# the job


@dataclass
class PPORun:
    """Everything one PPO iteration touches; ``iteration()`` is one pass of the loop in the module docstring."""

    cfg: PPOConfig
    job: TrainJob
    learner: PPOLearner
    reference: object
    tokenizer: object
    prompt_set: PromptSet
    prompts_per_iteration: int
    sync: PolicySync
    policy_client: object
    reward_client: object

    def train_state(self) -> dict:
        """What a checkpoint stores beside the tracked objects."""
        return {
            "policy_version": self.sync.version,
            "kl_coef": self.learner.kl_ctl.value,
            "iteration": self.job.step,
        }

    def iteration(self) -> None:
        """sync + generate + score, reference, update; then the job shell logs and checkpoints."""
        cfg, job = self.cfg, self.job
        rollout = self.scored_rollout(job.step)
        with job.phase("reference"):
            ref = reference_logprobs(self.reference, rollout, cfg.temperature, cfg.micro_batch_size)
        metrics = self.learner.step(rollout, ref, self.sync.version, phase=job.phase)
        self.sync.version += 1  # the updated weights; pushed at the start of the next iteration
        metrics["policy_version"] = rollout.policy_version
        job.end_step(metrics, train_state=self.train_state(), tokens=int(rollout.attention_mask.sum()))

    def scored_rollout(self, iteration: int):
        """The iteration's prompts, sampled at the trainer's version (pushed first when due), then scored."""
        cfg, job = self.cfg, self.job
        with job.phase("idle"):
            rows = iteration_prompts(
                len(self.prompt_set.prompts), self.prompts_per_iteration, iteration, cfg.seed
            )
            prompts = [self.prompt_set.prompts[i] for i in rows]
            ids = [self.prompt_set.token_ids[i] for i in rows]
        try:
            with calling("generation", cfg.generation_target):
                rollout = generate_rollout(
                    self.policy_client,
                    self.sync,
                    self.learner.policy,
                    self.tokenizer,
                    prompts,
                    ids,
                    cfg,
                    # no seed: the service seeds each row from (seed, sample index) alone, so one
                    # seed for a batch of prompts would give every row the same random stream
                    seed=None,
                    phase=job.phase,
                )
            with job.phase("score"), calling("reward", cfg.reward_target):
                score_rollout(self.reward_client, rollout, cfg.normalize_scores)
        except ServiceDown as exc:
            self.end_on_service_down(exc)
        return rollout

    def push_final(self) -> None:
        """The generation service serves the final policy."""
        try:
            with self.job.phase("sync"), calling("generation", self.cfg.generation_target):
                self.sync.push(self.learner.policy)
        except ServiceDown as exc:
            self.end_on_service_down(exc)

    def end_on_service_down(self, exc: ServiceDown):
        """Checkpoint at the current step boundary, then end the job with a message saying what to do."""
        checkpoint = self.job.save_checkpoint(self.train_state())
        raise ServiceDown(
            f"{exc} (still unavailable after service_retry_seconds={self.cfg.service_retry_seconds:g}); "
            f"checkpoint written at step {checkpoint.step} ({checkpoint.path}); bring the {exc.service} service "
            "back and run again with --resume",
            service=exc.service,
        ) from exc


def count_iterations(cfg: PPOConfig, n_prompts: int) -> tuple[int, int]:
    """(prompts per iteration, total iterations) for ``n_prompts`` training prompts."""
    per_iteration = cfg.batch_size // cfg.samples_per_prompt
    if per_iteration > n_prompts:
        raise ValueError(f"batch_size: {per_iteration} prompts per iteration, but only {n_prompts} prompts")
    per_pass = n_prompts // per_iteration
    return per_iteration, cfg.max_steps or max(1, math.ceil(cfg.epochs * per_pass))


def run_ppo(cfg: PPOConfig) -> Path:
    """Run PPO per ``cfg`` (see the module docstring); returns RUN_DIR/final (an HF folder)."""
    set_torch_threads(cfg.torch_threads)
    tokenizer = load_tokenizer(cfg.model)
    prompt_set = load_prompt_set(cfg, tokenizer)
    per_iteration, total = count_iterations(cfg, len(prompt_set.prompts))
    with TrainJob(cfg, kind="ppo", total_steps=total) as job:
        policy = load_causal_lm(cfg.model)  # eval mode: no dropout, so recomputed logprobs match sampling
        reference = load_causal_lm(cfg.reference_model or cfg.model)
        reference.requires_grad_(False)
        value_head = ValueHead(policy.config.hidden_size)
        learner = PPOLearner(policy, value_head, cfg, total)
        job.track("policy", policy, tokenizer=tokenizer)
        job.track("value_head", value_head)
        job.track("optimizer", learner.optimizer)
        job.track("scheduler", learner.scheduler)
        state = job.resume()
        learner.kl_ctl.value = float(state.get("kl_coef", learner.kl_ctl.value))
        policy_client, reward_client = make_clients(cfg)
        sync = PolicySync(
            policy_client,
            cfg.push_dir,
            job.job_id,
            replica_client=lambda address: make_policy_client(cfg, address),
        )
        sync.version = int(state.get("policy_version", 0))
        run = PPORun(
            cfg,
            job,
            learner,
            reference,
            tokenizer,
            prompt_set,
            per_iteration,
            sync,
            policy_client,
            reward_client,
        )
        try:
            while not job.done:
                run.iteration()
            final = job.run_dir / "final"
            if job.completed:
                run.push_final()
                save_final(policy, value_head, tokenizer, final, sync.version)
            job.finish(final if job.completed else None)
        finally:
            sync.close()
            policy_client.close()
            reward_client.close()
    return final


def save_final(policy, value_head: ValueHead, tokenizer, folder: Path, version: int) -> None:
    """RUN_DIR/final: the policy as an HF folder (the generation service loads it), value head beside it."""
    with atomic_folder(folder) as tmp:
        policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_file(
            {k: v.contiguous() for k, v in value_head.state_dict().items()},
            str(tmp / "value_head.safetensors"),
        )
        (tmp / "rlhf_policy.json").write_text(json.dumps({"policy_version": version, "trained_with": "ppo"}))

"""TRL 0.11.4 PPOv2Trainer baseline (the last TRL with a PPO trainer): time per PPO iteration. Runs in its own venv.

Policy, reference, reward and value models all load from the same checkpoint, 1 PPO epoch, 1 minibatch.
usage: python trl_ppov2.py MODEL_DIR RM_DIR PROMPTS_JSON OUT_JSON --iterations N --threads T
"""

import json
import tempfile
from pathlib import Path

import torch
from _timing import StepTimer, baseline_parser, train_and_report
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import PPOv2Config, PPOv2Trainer


def main():
    p = baseline_parser()
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--rollouts", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    tok = load_tokenizer(a.model_dir)
    ds = prompt_dataset(tok, json.loads(Path(a.prompts_json).read_text()))
    policy, ref, value, reward = load_models(a.model_dir, a.rm_dir, tok.pad_token_id)
    with tempfile.TemporaryDirectory() as out:
        cfg = PPOv2Config(
            output_dir=out,
            per_device_train_batch_size=a.rollouts,
            gradient_accumulation_steps=1,
            num_mini_batches=1,
            num_ppo_epochs=1,
            total_episodes=a.rollouts * a.iterations,
            local_rollout_forward_batch_size=a.rollouts,
            response_length=a.max_new_tokens,
            temperature=a.temperature,
            stop_token="eos",
            num_sample_generations=0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            learning_rate=1e-6,
            logging_steps=1,
        )
        timer = StepTimer()
        trainer = PPOv2Trainer(
            config=cfg,
            tokenizer=tok,
            policy=policy,
            ref_policy=ref,
            reward_model=reward,
            value_model=value,
            train_dataset=ds,
            callbacks=[timer],
        )
        train_and_report(trainer, timer, a.out_json, a.rollouts, a.threads)


def load_tokenizer(model_dir: str):
    """Left-padding tokenizer with a pad token and the chat template (transformers 4.46 does not read the file)."""
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    template = Path(model_dir) / "chat_template.jinja"
    if tok.chat_template is None and template.exists():
        tok.chat_template = template.read_text()
    return tok


def prompt_dataset(tok, prompts: list[str]) -> Dataset:
    rows = [
        {"input_ids": tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)}
        for t in prompts
    ]
    return Dataset.from_list(rows)


def load_models(model_dir: str, rm_dir: str, pad_token_id: int):
    """(policy, reference, value, reward): the policies from ``model_dir``, value and reward from ``rm_dir``."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(
        rm_dir, num_labels=1, torch_dtype=torch.float32
    )
    reward = AutoModelForSequenceClassification.from_pretrained(
        rm_dir, num_labels=1, torch_dtype=torch.float32
    )
    for m in (value, reward):
        m.config.pad_token_id = pad_token_id
    return policy, ref, value, reward


if __name__ == "__main__":
    main()

"""TRL GRPOTrainer baseline: time per optimizer step at the benchmark's settings. Runs in its own venv.

usage: python trl_grpo.py MODEL_DIR RM_DIR PROMPTS_JSON OUT_JSON --steps N --threads T
"""

import json
import tempfile
from pathlib import Path

import torch
from _timing import StepTimer, baseline_parser, train_and_report
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer


def main():
    p = baseline_parser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--generations", type=int, default=4)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    prompts = json.loads(Path(a.prompts_json).read_text())
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} for t in prompts])
    tok = AutoTokenizer.from_pretrained(a.model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(a.rm_dir, num_labels=1, dtype=torch.float32)
    rm_tok = AutoTokenizer.from_pretrained(a.rm_dir)
    if rm_tok.pad_token is None:
        rm_tok.pad_token = rm_tok.eos_token
    rm.config.pad_token_id = rm_tok.pad_token_id
    batch = a.prompts_per_step * a.generations
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=batch,
            num_generations=a.generations,
            max_completion_length=a.max_new_tokens,
            temperature=a.temperature,
            beta=0.0,
            max_steps=a.steps,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            learning_rate=1e-6,
            dataloader_num_workers=0,
        )
        timer = StepTimer()
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=rm,
            reward_processing_classes=rm_tok,
            args=cfg,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[timer],
        )
        train_and_report(trainer, timer, a.out_json, batch, a.threads)


if __name__ == "__main__":
    main()

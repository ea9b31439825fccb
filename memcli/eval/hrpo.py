"""HRPO evaluation: greedy accuracy on GSM8K-format problems, decoded as the run was trained (hybrid or plain)."""

from __future__ import annotations

from pathlib import Path

from memcli.errors import MemcliError
from memcli.hrpo.data import encode_prompts
from memcli.hrpo.rewards import extract_answer, gsm8k_reward


def decode(tok, ro) -> list[str]:
    return [tok.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(ro.completion_ids, ro.completion_mask)]


def evaluate(model, tok, problems: list[dict], max_new_tokens: int, max_prompt_length: int, batch: int = 16) -> dict:
    """Greedy accuracy and the share of well-formed ``#### n`` answers, decoded as ``model.cfg.hybrid`` says."""
    model.eval()
    correct = formed = 0
    for i in range(0, len(problems), batch):
        part = problems[i:i + batch]
        ids, mask = encode_prompts(tok, [p["question"] for p in part], max_prompt_length, model.cfg.instruction)
        ro = model.generate(tok, ids, mask, max_new_tokens, temperature=0.0)
        texts = decode(tok, ro)
        rew = gsm8k_reward(texts, [p["answer"] for p in part])
        correct += int(sum(rew))
        formed += sum(extract_answer(t) is not None for t in texts)
    n = max(1, len(problems))
    return {"accuracy": correct / n, "well_formed": formed / n, "eval_n": len(problems)}


def compare_rows(run, data: Path, num: int | None, max_new_tokens: int) -> dict:
    """``memcli compare checkpoints`` rows of an HRPO run: greedy accuracy on a GSM8K-format file, prompts cut as
    the run was trained."""
    from memcli.hrpo.data import load_problems

    if not data.is_file():
        raise MemcliError(f"--data {data}: expected a GSM8K-format JSONL file for HRPO runs")
    prompt_len = run.config.get("dataset", {}).get("max_prompt_length", 512)
    return evaluate(run.model, run.tok, load_problems(data)[:num], max_new_tokens, prompt_len)

"""Supervised warm start of the tiny model on the synthetic train split, and its greedy test accuracy.

Why this warm start (shared notes, testbed.md): a model SFT'd on solutions that always end ``#### N`` was already
peaked and GRPO could not move it. The study's model instead scored ~8% strict at step 0 because it rarely wrote
``#### N``, and GRPO taught it the format. So the SFT data ends with ``#### N`` only sometimes and with
``The answer is N.`` otherwise. The share depends on the problem's topic: in a few "marked" topics most solutions end
``#### N`` (greedy decoding then writes it there, giving a strict accuracy well above 0 but far below the last-number
accuracy), elsewhere only a few do (sampled rollouts still write it now and then, so GRPO gets reward to learn from).
"""
from __future__ import annotations

import math
import random
import time
from typing import Mapping, Sequence

import torch

from noisebench.scoring import extract_strict, make_prompt, score
from noisebench.testbeds.arith import TOPICS, Problem, solve

WARMSTART_KEYS = ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "num_threads", "format",
                  "mistakes", "eval_items", "eval_batch_size")
FORMAT_KEYS = ("marked_topics", "marked_share", "unmarked_share")
MISTAKE_KEYS = ("share", "rules")
ALL_HASH = {"marked_topics": 0, "marked_share": 1.0, "unmarked_share": 1.0}  # every solution ends "#### N"
NO_MISTAKES = {"share": 0.0, "rules": []}
#: ``progress_hook(step, steps)`` after every SFT step when set: the console's warm-start bar (noisebench.console).
progress_hook = None


def check_keys(section: Mapping, valid: Sequence[str], where: str) -> None:
    """Refuse unknown keys by name (a typo must not silently fall back to a default)."""
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; valid keys: {list(valid)}")


def marked_topics(n_marked: int, seed: int) -> list[int]:
    """Indices of the topics whose warm-start solutions mostly end ``#### N`` (a fixed draw from ``seed``)."""
    if not 0 <= n_marked <= len(TOPICS):
        raise ValueError(f"testbed.warmstart.format.marked_topics must be in [0, {len(TOPICS)}], got {n_marked}")
    return sorted(random.Random(f"format-{seed}").sample(range(len(TOPICS)), n_marked))


def sft_completion(p: Problem, hash_format: bool, mistakes: Sequence[str] = ()) -> str:
    """The warm-start target after the prompt: a newline, the equation lines, then the final-answer line.

    With ``mistakes`` the lines and the answer follow those wrong rules (the reward still checks the true answer).
    """
    steps, result = solve(p, mistakes) if mistakes else (p.steps, p.result)
    last = f"#### {result}" if hash_format else f"The answer is {result}."
    return "\n" + "\n".join(steps + (last,))


def sft_pairs(problems: Sequence[Problem], fmt: Mapping | None, seed: int,
              mistakes: Mapping | None = None) -> list[tuple[str, str]]:
    """(prompt, completion) pairs with the topic-dependent answer format of ``fmt`` and, on a ``mistakes.share`` of
    the problems, solutions worked under the wrong rules ``mistakes.rules``.

    Why wrong rules: RL on real models mostly sharpens what the model can already sample; a warm start that solves
    most problems right only part of the time (pass@8 far above pass@1) lets GRPO raise correctness, not just format.
    Each draw has its own RNG stream, so turning one on leaves the other's draws unchanged.
    """
    fmt = ALL_HASH if fmt is None else fmt
    mistakes = NO_MISTAKES if mistakes is None else mistakes
    check_keys(fmt, FORMAT_KEYS, "testbed.warmstart.format")
    check_keys(mistakes, MISTAKE_KEYS, "testbed.warmstart.mistakes")
    share, rules = float(mistakes["share"]), tuple(mistakes["rules"])
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"testbed.warmstart.mistakes.share must be in [0, 1], got {share}")
    marked = set(marked_topics(int(fmt["marked_topics"]), seed))
    rng, wrong = random.Random(f"format-draw-{seed}"), random.Random(f"mistakes-draw-{seed}")
    out = []
    for p in problems:
        hash_share = fmt["marked_share"] if p.topic in marked else fmt["unmarked_share"]
        hash_format = rng.random() < hash_share
        use = rules if share > 0 and wrong.random() < share else ()
        out.append((make_prompt(p.question), sft_completion(p, hash_format, use)))
    return out


def _batch(prompts, completions, idx, pad_id, device):
    """Right-padded input ids, attention mask and labels (loss on the completion and its eos only)."""
    seqs = [prompts[i] + completions[i] for i in idx]
    width = max(map(len, seqs))
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, (i, s) in enumerate(zip(idx, seqs)):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
        labels[row, len(prompts[i]):len(s)] = torch.tensor(completions[i])
    return ids.to(device), mask.to(device), labels.to(device)


def train_sft(model, tokenizer, pairs: Sequence[tuple[str, str]], wcfg: Mapping, seed: int,
              device: str = "cpu", log=None) -> dict:
    """Plain SFT (AdamW betas .9/.98, linear warmup then cosine to 10%, grad clip 1.0); returns timing and loss.

    The data order comes from a private generator seeded with ``seed``, so the result is a function of the config.
    """
    steps, bsz = int(wcfg["steps"]), int(wcfg["batch_size"])
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    completions = [c + [tokenizer.eos_token_id]
                   for c in tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]]
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=float(wcfg["lr"]), betas=(0.9, 0.98),
                            weight_decay=float(wcfg["weight_decay"]))
    warm = max(1, int(wcfg["warmup_steps"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm))))))
    gen = torch.Generator().manual_seed(seed)
    order, pos, losses, t0 = torch.randperm(len(pairs), generator=gen), 0, [], time.perf_counter()
    for _ in range(steps):
        if pos + bsz > len(order):
            order, pos = torch.randperm(len(pairs), generator=gen), 0
        ids, mask, labels = _batch(prompts, completions, order[pos:pos + bsz].tolist(), tokenizer.pad_token_id,
                                   device)
        pos += bsz
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress_hook is not None:
            progress_hook(len(losses), steps)
        if log is not None and len(losses) % 100 == 0:
            log(f"warm start step {len(losses)}/{steps}: loss {sum(losses[-100:]) / 100:.4f}, "
                f"{time.perf_counter() - t0:.0f} s")
    tail = losses[-20:] or [float("nan")]
    return {"sft_seconds": time.perf_counter() - t0, "sft_steps": steps,
            "sft_final_loss": sum(tail) / len(tail)}


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: Sequence[Problem], max_new_tokens: int, batch_size: int = 250,
                    device: str = "cpu") -> dict:
    """Greedy test accuracy under the study's prompt: strict (``####``), flexible (last number), format rate."""
    was_training = model.training
    model.eval()
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    strict = flexible = marked = 0
    t0 = time.perf_counter()
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            enc = tokenizer([make_prompt(p.question) for p in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for p, text in zip(chunk, texts):
                strict += score(text, str(p.result), "strict")[0]
                flexible += score(text, str(p.result), "flexible")[0]
                marked += extract_strict(text) is not None
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    n = max(1, len(problems))
    return {"acc_strict": strict / n, "acc_flexible": flexible / n, "format_rate": marked / n,
            "eval_items": len(problems), "eval_seconds": time.perf_counter() - t0}

"""The GSM8K slice every moeprof run starts from, and the prompts file format.

A prompts file holds questions joined by a separator line (``---``), the format most hand-written
MoE logging scripts read; ``.jsonl`` files hold ``{"idx", "prompt"}`` objects instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from moeprof.errors import UserError
from moeprof.outfiles import refuse_existing, write_new

SEPARATOR = "\n\n---\n\n"
HUB_DATASET = ("openai/gsm8k", "main")


def load_gsm8k(n: int, source: Path | None = None) -> list[str]:
    """The first ``n`` questions of the GSM8K test split, in the split's order."""
    questions = _local_questions(source, n) if source is not None else _hub_questions(n)
    if len(questions) < n:
        where = source or "the hub"
        raise UserError(f"{where}: only {len(questions)} questions, {n} asked for")
    return questions


def _local_questions(source: Path, n: int) -> list[str]:
    if not source.is_file():
        raise UserError(f"{source}: no such file")
    if source.suffix == ".parquet":
        import datasets

        rows = datasets.load_dataset("parquet", data_files=str(source), split="train")
        return [str(q) for q in rows.select(range(min(n, len(rows))))["question"]]
    questions: list[str] = []
    with source.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if len(questions) == n:
                break
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                questions.append(str(row["question"]))
            except (ValueError, KeyError, TypeError) as e:
                reason = f"no 'question' field ({e})" if isinstance(e, KeyError) else str(e)
                raise UserError(f"{source}:{lineno}: {reason}") from None
    return questions


def _hub_questions(n: int) -> list[str]:
    import datasets

    try:
        rows = datasets.load_dataset(*HUB_DATASET, split="test")
    except Exception as e:  # datasets raises many types for "offline"
        raise UserError(
            f"could not load {HUB_DATASET[0]} from the Hugging Face hub ({type(e).__name__}); "
            "pass a local copy with --source PATH (JSONL or parquet)"
        ) from None
    return [str(q) for q in rows.select(range(min(n, len(rows))))["question"]]


def write_prompts(
    questions: Sequence[str], out: Path, jsonl: Path | None = None, *, force: bool = False
) -> list[Path]:
    """Write the text file (and optionally JSONL); refuse to overwrite unless ``force``.

    Both targets are checked before either is written."""
    targets = [out] + ([jsonl] if jsonl else [])
    for path in targets:
        refuse_existing(path, force)
    for path in targets:
        write_new(path, _prompts_text(questions, jsonl=path.suffix == ".jsonl"), force=force)
    return targets


def _prompts_text(questions: Sequence[str], *, jsonl: bool) -> str:
    if jsonl:
        lines = (
            json.dumps({"idx": i, "prompt": q}, ensure_ascii=False) for i, q in enumerate(questions)
        )
        return "\n".join(lines) + "\n"
    return SEPARATOR.join(q.strip() for q in questions) + "\n"


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file written by :func:`write_prompts` (text or JSONL)."""
    if not path.is_file():
        raise UserError(f"{path}: no such prompts file (make one with `moeprof prompts`)")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        prompts = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{lineno}: not a prompt record ({e})") from None
    else:
        prompts = [p.strip() for p in text.split("\n---\n") if p.strip()]
    if not prompts:
        raise UserError(f"{path}: the prompts file is empty")
    return prompts

"""One vLLM engine in its own process: start, generate, report, shut down.

``generate`` and the benchmarks start this module as a fresh process per run, so the hook's
environment is set before vLLM starts and no run inherits another's state. It reads a JSON spec,
writes a JSON result, and reports progress as JSON lines on a file descriptor the parent reads.

Usage: ``python -m moeprof.engine_run SPEC.json RESULT.json EVENTS_FD``
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

PASS_GATE = "MOEPROF_PASS_GATE"
"""A FIFO's path. When set, the engine waits for one byte from it before each timed pass and
before shutting down, after saying so (``pass_waiting``): a benchmark then runs the passes of
several live engines one at a time (``bench/overhead_interleaved.py``)."""


class _Events:
    def __init__(self, fd: int) -> None:
        self._fh = os.fdopen(fd, "w", buffering=1) if fd >= 0 else None

    def emit(self, event: str, **fields: Any) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps({"event": event, **fields}) + "\n")


def _progress_bar(events: _Events) -> Any:
    """A tqdm that vLLM drives and that reports to the parent instead of the terminal."""
    from tqdm import tqdm

    class EventBar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 - closed with the bar
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            if self.desc.startswith("Processed"):
                events.emit("progress", done=self.n, total=self.total)
            return out

        def close(self) -> None:
            super().close()
            self.fp.close()

    return EventBar


def run(spec: dict[str, Any], events: _Events) -> dict[str, Any]:
    """Start the engine, run the warm-up and the timed passes, shut it down; the result."""
    import torch
    import vllm

    llm, engine_start = _start_engine(spec, events)
    prompts = _prompts(llm, spec)
    params = _sampling_params(spec)
    warmup_outputs = _warm_up(llm, prompts, params, spec.get("warmup", 0), events)
    passes, outputs = _timed_passes(llm, prompts, params, spec["repeat"], events)
    _wait_for_turn(events, spec["repeat"])
    _shutdown(llm, events)
    return {
        "engine_start_sec": engine_start,
        "passes": passes,
        "outputs": outputs,
        "warmup_outputs": warmup_outputs,
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
    }


def _start_engine(spec: dict[str, Any], events: _Events) -> tuple[Any, float]:
    """``vllm.LLM`` with the spec's engine settings (prefix caching off unless the spec turns it
    on); its start time."""
    from vllm import LLM

    t0 = time.perf_counter()
    events.emit("engine_starting")
    llm = LLM(
        model=spec["model"],
        tokenizer=spec.get("tokenizer") or None,
        seed=spec["seed"],
        max_model_len=spec["max_model_len"],
        enable_prefix_caching=bool(spec.get("prefix_caching", False)),
        enforce_eager=spec["enforce_eager"],
        load_format=spec["load_format"],
        dtype=spec["dtype"],
        skip_tokenizer_init=spec.get("skip_tokenizer_init", False),
        **spec.get("engine_args", {}),
        **(
            {"gpu_memory_utilization": spec["gpu_memory_utilization"]}
            if spec.get("gpu_memory_utilization")
            else {}
        ),
    )
    seconds = time.perf_counter() - t0
    events.emit("engine_ready", seconds=seconds)
    return llm, seconds


def _sampling_params(spec: dict[str, Any]) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=spec["max_tokens"],
        temperature=spec["temperature"],
        seed=spec["seed"],
        ignore_eos=spec["ignore_eos"],
        detokenize=not spec.get("skip_tokenizer_init", False),
    )


def _warm_up(
    llm: Any, prompts: list[Any], params: Any, passes: int, events: _Events
) -> list[dict[str, Any]]:
    """Untimed passes (benchmarks); their outputs, as ``repeat`` -1."""
    outputs: list[dict[str, Any]] = []
    for _ in range(passes):
        warm = llm.generate(prompts, params, use_tqdm=False)
        outputs.extend(_output_records(warm, rep=-1))
        events.emit("warmup_done")
    return outputs


def _timed_passes(
    llm: Any, prompts: list[Any], params: Any, repeat: int, events: _Events
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``repeat`` timed passes over the prompts: per pass its wall time and token counts, and
    every pass's outputs."""
    bar = _progress_bar(events)
    passes: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    for rep in range(repeat):
        _wait_for_turn(events, rep)
        events.emit("pass_starting", index=rep, total=repeat)
        t0 = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=bar)
        wall = time.perf_counter() - t0
        prompt_toks = sum(len(r.prompt_token_ids or []) for r in results)
        gen_toks = sum(len(r.outputs[0].token_ids) for r in results)
        cached = sum(getattr(r, "num_cached_tokens", None) or 0 for r in results)
        passes.append(
            {
                "wall_time_sec": wall,
                "tokens_generated": gen_toks,
                "prompt_tokens": prompt_toks,
                "cached_prompt_tokens": cached,
            }
        )
        outputs.extend(_output_records(results, rep))
        events.emit("pass_done", index=rep, seconds=wall, tokens=gen_toks)
    return passes, outputs


def _wait_for_turn(events: _Events, index: int) -> None:
    """With ``PASS_GATE`` set, wait for the go of whoever runs the engines' passes in turn:
    before timed pass ``index`` (``index`` = the number of passes: before shutting down)."""
    gate = os.environ.get(PASS_GATE)
    if not gate:
        return
    events.emit("pass_waiting", index=index)
    with open(gate, "rb") as fh:  # a FIFO: opening blocks until the parent opens it to write
        if not fh.read(1):
            raise SystemExit(f"{PASS_GATE}: {gate} closed without a go")


def _shutdown(llm: Any, events: _Events) -> None:
    """Stop the engine, so the hook's writer drains and the log is complete."""
    t0 = time.perf_counter()
    llm.llm_engine.engine_core.shutdown()
    events.emit("engine_stopped", seconds=time.perf_counter() - t0)


def _output_records(results: list[Any], rep: int) -> list[dict[str, Any]]:
    """Per request what ``validate --outputs`` accounts for: prompt and generated tokens and the
    prompt tokens served from the prefix cache (not routed), plus the token ids themselves."""
    records = []
    for idx, r in enumerate(results):
        out = r.outputs[0]
        prompt_ids = list(r.prompt_token_ids or [])
        cached = getattr(r, "num_cached_tokens", None)
        records.append(
            {
                "req_id": r.request_id,
                "prompt_idx": idx,
                "repeat": rep,
                "prompt_tokens": len(prompt_ids),
                "generated_tokens": len(out.token_ids),
                "num_cached_tokens": int(cached) if cached is not None else None,
                "prompt_token_ids": prompt_ids,
                "output_token_ids": list(out.token_ids),
                "text": out.text,
                "finish_reason": out.finish_reason,
            }
        )
    return records


def _prompts(llm: Any, spec: dict[str, Any]) -> list[Any]:
    if spec.get("prompt_token_ids"):
        return [{"prompt_token_ids": ids} for ids in spec["prompt_token_ids"]]
    prompts = spec["prompts"]
    if spec.get("chat") is False:
        return prompts
    tokenizer = llm.get_tokenizer()
    if not getattr(tokenizer, "chat_template", None):
        if spec.get("chat"):
            raise SystemExit(f"{spec['model']}: the tokenizer has no chat template (--no-chat)")
        return prompts
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def main(argv: list[str]) -> int:
    spec_path, result_path, fd = argv[0], argv[1], int(argv[2])
    with open(spec_path) as fh:
        spec = json.load(fh)
    result = run(spec, _Events(fd))
    with open(result_path, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

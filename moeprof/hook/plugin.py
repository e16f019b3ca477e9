"""vLLM's ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in every one of its processes. With ``VLLM_LOG_MOE`` unset it reads
that one variable and returns: no other moeprof module, and nothing of torch or vLLM, is imported.
"""

import os

ENV_LOG = "VLLM_LOG_MOE"


def register() -> None:
    if not os.environ.get(ENV_LOG):
        return
    from moeprof.hook.install import install

    install()

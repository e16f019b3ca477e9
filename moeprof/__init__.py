"""moeprof: per-token MoE routing logs from vLLM, and the tools to check and read them."""

__version__ = "0.1.0"

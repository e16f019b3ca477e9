# The two commands of README.md, and a few for development. Every target sets up .venv first
# (scripts/setup.sh is idempotent: after the first run it only refreshes moeprof itself).
.PHONY: setup demo test lint bench

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check moeprof tests bench
	.venv/bin/ruff format --check moeprof tests bench

bench: setup
	.venv/bin/python bench/overhead.py --json bench/results/overhead_cpu.json
	.venv/bin/python bench/analysis_throughput.py --json bench/results/analysis_throughput.json

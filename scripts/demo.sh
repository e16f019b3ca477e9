#!/usr/bin/env bash
# The main job on the embedded default: GSM8K prompts -> baseline and logged runs of the tiny
# MoE model on CPU, every MoE layer logged -> validate -> analyze (every analysis) -> plot. Everything lands in ${1:-runs/demo}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
MOEPROF=.venv/bin/moeprof
GSM8K=../shared/data/gsm8k_test.jsonl

mkdir -p "$OUT"
if [ -f "$GSM8K" ]; then
    $MOEPROF prompts --source "$GSM8K" -n 25 --out "$OUT/prompts.txt" --force
else
    $MOEPROF prompts -n 25 --out "$OUT/prompts.txt" --force   # from the Hugging Face hub
fi
$MOEPROF generate --model tiny --prompts "$OUT/prompts.txt" --out-dir "$OUT" --log-layer all --force
$MOEPROF validate "$OUT/moe_routes.jsonl" --outputs "$OUT/outputs.jsonl"
$MOEPROF analyze "$OUT/moe_routes.jsonl" --full --outputs "$OUT/outputs.jsonl" \
    --markdown "$OUT/analysis.md" --force
$MOEPROF plot "$OUT/moe_routes.jsonl" --out "$OUT/expert_hist.png" --force
$MOEPROF plot "$OUT/moe_routes.jsonl" --kind reuse --out "$OUT/reuse.png" --force
echo "demo done: $OUT (moe_routes.jsonl, timing.json, outputs.jsonl, analysis.md, expert_hist.png, reuse.png)"

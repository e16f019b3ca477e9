#!/usr/bin/env bash
# On the lent GPU machine (no network): install the vLLM 0.26 kit once, make moeprof's vLLM
# plugin visible without pip-installing moeprof, then run the command given, e.g.
#   bash bench/gpu/run.sh python bench/overhead.py --model bench/gpu/qwen15-moe-a2.7b ...
set -u
bash bench/gpu/kit_receive.sh
rc=$?
if [ "$rc" = 3 ]; then exit 0; fi   # parts still arriving
if [ "$rc" != 0 ]; then exit "$rc"; fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
dist=/tmp/site/moeprof_dev-0.0.dist-info
mkdir -p "$dist"
printf 'Metadata-Version: 2.1\nName: moeprof-dev\nVersion: 0.0\n' >"$dist/METADATA"
printf '[vllm.general_plugins]\nmoeprof = moeprof.hook.plugin:register\n' >"$dist/entry_points.txt"
export PYTHONUNBUFFERED=1
# vLLM 0.26 imports flashinfer for its sampler unless told not to; the kit leaves flashinfer out.
export VLLM_USE_FLASHINFER_SAMPLER=0
[ "$#" -gt 0 ] && exec "$@"

#!/usr/bin/env bash
# hf_vasso GPU check: one command on a single-GPU machine with no network.
#
#   bash benchmarks/gpu_check.sh                 # all checks, ~3-5 min on one H100; results in benchmarks/results/
#   bash benchmarks/gpu_check.sh --only bf16     # a subset (fp16_overflow, bf16, throughput_vit,
#                                                #   throughput_llama_lora, fsdp2_trainer)
#   bash benchmarks/gpu_check.sh --cpu-smoke     # tiny models on CPU: tests the script itself, not the GPU
#
# Needs torch, transformers, accelerate and peft; imports hf_vasso from this checkout (no install, no download: all
# models are random-init from configs, all data synthetic). Writes benchmarks/results/gpu_check.{md,json} after every
# check, so a run cut short still leaves the finished ones. Exit code 1 if a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
if [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  export CUDA_VISIBLE_DEVICES=0  # one GPU: the FSDP2 check launches a single process on it
fi
# Hard stop: the Python side already skips checks that would not fit in --budget-s (default 330 s).
exec timeout -k 15 "${GPU_CHECK_TIMEOUT_S:-420}" python benchmarks/gpu_check.py "$@"

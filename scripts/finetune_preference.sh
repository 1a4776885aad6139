#!/usr/bin/env bash
# Preference alignment of the SFT model: the exercise's preference script, through `mllm logp` + `mllm train preference`.
# 1. reference log-probs of every pair under the SFT model (resumable; sharded over NPROC GPUs),
# 2. nca_pair preference training with LoRA against them (resumable: rerun the script after an interruption),
# 3. the LoRA adapter merged into a plain model directory (OUT/merged) for `mllm answer` / CHAIR.
# Override any variable from the environment, e.g. `NPROC=8 MODEL=output/sft_lora/merged scripts/finetune_preference.sh`.
# Extra arguments are passed on to the trainer (any transformers TrainingArguments flag works).
set -euo pipefail

MODEL=${MODEL:-output/sft_lora/merged}
DATA=${DATA:-data/preference_train.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-}
OUT=${OUT:-output/preference_lora}
LOGPS=${LOGPS:-$OUT/reference_logps.jsonl}
NPROC=${NPROC:-1}                                   # processes (GPUs) on this machine
MAX_STEPS=${MAX_STEPS:--1}                          # -1: the epochs decide
DS_CONFIG=${DS_CONFIG:-configs/ds_zero2.json}
BETA=${BETA:-0.1}
LOSS_TYPE=${LOSS_TYPE:-nca_pair}
LR=${LR:-1e-5}
EPOCHS=${EPOCHS:-1}
LOGP_BATCH=${LOGP_BATCH:-4}

image_args=()       # the trainer's spelling (a TrainingArguments-style field) and the other commands' one
image_root_args=()
if [ -n "$IMAGE_FOLDER" ]; then image_args=(--image-folder "$IMAGE_FOLDER"); image_root_args=(--image-root "$IMAGE_FOLDER"); fi
mkdir -p "$OUT"

torchrun --nproc_per_node "$NPROC" -m mllm logp \
    "$MODEL" --data "$DATA" --out "$LOGPS" "${image_root_args[@]}" \
    --batch-size "$LOGP_BATCH" --max-length 2048

torchrun --nproc_per_node "$NPROC" -m mllm train preference \
    --model "$MODEL" --data "$DATA" --logps "$LOGPS" "${image_args[@]}" --output-dir "$OUT" \
    --beta "$BETA" --loss-type "$LOSS_TYPE" --use-average-logp false --sft-weight 0 \
    --use-lora true --tune-llm false --tune-vision false --tune-resampler true \
    --lora-r 64 --lora-alpha 64 --lora-dropout 0.05 \
    --max-length 2048 --bf16 true --gradient-checkpointing true \
    --per-device-train-batch-size 1 --gradient-accumulation-steps 4 \
    --num-train-epochs "$EPOCHS" --learning-rate "$LR" --weight-decay 0.01 --adam-beta2 0.95 \
    --warmup-steps 0.05 --lr-scheduler-type cosine \
    --save-strategy steps --save-steps 100 --save-total-limit 3 \
    --logging-steps 1 --report-to tensorboard \
    --resume-from-checkpoint auto \
    --max-steps "$MAX_STEPS" --deepspeed "$DS_CONFIG" "$@"

mllm merge-lora "$MODEL" "$OUT" "$OUT/merged" --overwrite

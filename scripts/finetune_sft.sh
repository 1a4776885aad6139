#!/usr/bin/env bash
# Supervised fine-tuning with evaluation: the exercise's finetune_ds_witheval.sh, through `mllm train sft`.
# Override any variable from the environment, e.g. `NPROC=8 MODEL=/data/MLLM_Excercise_Model scripts/finetune_sft.sh`.
# Extra arguments are passed on to the trainer (any transformers TrainingArguments flag works).
set -euo pipefail

MODEL=${MODEL:-MLLM_Excercise_Model}
DATA=${DATA:-data/train.json}
EVAL_DATA=${EVAL_DATA:-data/test.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-.}
OUT=${OUT:-output/sft_lora}
NPROC=${NPROC:-1}                                   # processes (GPUs) on this machine
MAX_STEPS=${MAX_STEPS:--1}                          # -1: the epochs decide
DS_CONFIG=${DS_CONFIG:-configs/ds_zero2.json}

torchrun --nproc_per_node "$NPROC" -m mllm train sft \
    --model "$MODEL" --data "$DATA" --eval-data "$EVAL_DATA" --image-folder "$IMAGE_FOLDER" \
    --output-dir "$OUT" \
    --use-lora true --tune-llm false --tune-vision false --tune-resampler true \
    --lora-r 64 --lora-alpha 64 --lora-dropout 0.05 \
    --max-length 2048 --bf16 true --gradient-checkpointing true \
    --per-device-train-batch-size 1 --gradient-accumulation-steps 1 --per-device-eval-batch-size 1 \
    --num-train-epochs 1 --learning-rate 1e-4 --weight-decay 0.1 --adam-beta2 0.95 \
    --warmup-steps 0.01 --lr-scheduler-type cosine \
    --eval-strategy steps --eval-steps 100 --save-strategy steps --save-steps 100 --save-total-limit 3 \
    --logging-steps 1 --report-to tensorboard \
    --resume-from-checkpoint auto \
    --max-steps "$MAX_STEPS" --deepspeed "$DS_CONFIG" "$@"

mllm merge-lora "$MODEL" "$OUT" "$OUT/merged" --overwrite
mllm eval vqa "$OUT/merged" --data "$EVAL_DATA" --image-root "$IMAGE_FOLDER" --out "$OUT/test_predictions.jsonl"

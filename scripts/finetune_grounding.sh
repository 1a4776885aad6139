#!/usr/bin/env bash
# Grounding fine-tuning: Shikra-format REC/GC/Flickr30k data -> SFT conversations (`mllm prepare-grounding`), then
# `mllm train grounding` (SFT on the prepared file: same trainer, same flags), then RefCOCO-family evaluation.
# Boxes are written as [x0, y0, x1, y1] on a 0..1000 grid (mllm/boxes.py), which is what evaluation reads.
# Override any variable from the environment, e.g.
#   NPROC=8 MODEL=/data/MLLM_Excercise_Model SHIKRA=/data/shikra_data IMAGES=/data/coco2014/train2014 scripts/finetune_grounding.sh
# Extra arguments are passed on to the trainer (any transformers TrainingArguments flag works).
set -euo pipefail

MODEL=${MODEL:-MLLM_Excercise_Model}
SHIKRA=${SHIKRA:-data/shikra}                       # folder of the Shikra jsonl files and templates
IMAGES=${IMAGES:-data/coco2014/train2014}           # images named by img_path
REC=${REC:-$SHIKRA/REC_ref3_train.jsonl}
REC_TEMPLATES=${REC_TEMPLATES:-$SHIKRA/template/REC.json}
PREPARED=${PREPARED:-output/grounding_train.json}
OUT=${OUT:-output/grounding_lora}
NPROC=${NPROC:-1}                                   # processes (GPUs) on this machine
MAX_STEPS=${MAX_STEPS:--1}                          # -1: the epochs decide
DS_CONFIG=${DS_CONFIG:-configs/ds_zero2.json}
EVAL_SPLITS=${EVAL_SPLITS:-"REC_refcoco_unc_val REC_refcoco_unc_testA REC_refcoco_unc_testB REC_refcoco+_unc_val REC_refcoco+_unc_testA REC_refcoco+_unc_testB REC_refcocog_umd_val REC_refcocog_umd_test"}

if [ ! -f "$PREPARED" ]; then   # deterministic for a seed; delete the file to prepare it again
    mkdir -p "$(dirname "$PREPARED")"
    mllm prepare-grounding --rec "$REC" --rec-templates "$REC_TEMPLATES" --image-root "$IMAGES" \
        --out "$PREPARED" --seed 0
fi

torchrun --nproc_per_node "$NPROC" -m mllm train grounding \
    --model "$MODEL" --data "$PREPARED" --image-folder "$IMAGES" --output-dir "$OUT" \
    --use-lora true --tune-llm false --tune-vision false --tune-resampler true \
    --lora-r 64 --lora-alpha 64 --lora-dropout 0.05 \
    --max-length 2048 --bf16 true --gradient-checkpointing true \
    --per-device-train-batch-size 1 --gradient-accumulation-steps 4 \
    --num-train-epochs 1 --learning-rate 1e-4 --weight-decay 0.1 --adam-beta2 0.95 \
    --warmup-steps 0.01 --lr-scheduler-type cosine \
    --save-strategy steps --save-steps 200 --save-total-limit 3 \
    --logging-steps 1 --report-to tensorboard \
    --resume-from-checkpoint auto \
    --max-steps "$MAX_STEPS" --deepspeed "$DS_CONFIG" "$@"

mllm merge-lora "$MODEL" "$OUT" "$OUT/merged" --overwrite

data_args=()
for split in $EVAL_SPLITS; do
    if [ -f "$SHIKRA/$split.jsonl" ]; then data_args+=(--data "$SHIKRA/$split.jsonl"); fi
done
if [ ${#data_args[@]} -gt 0 ]; then   # resumable: a rerun answers only what is missing
    mllm eval grounding "$OUT/merged" "${data_args[@]}" --image-root "$IMAGES" \
        --out "$OUT/eval_grounding" --batch-size 8 --vis 16
fi

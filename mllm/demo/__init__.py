"""`mllm demo`: the toy world end to end (data, tokenizer, a tiny model from scratch, SFT, evaluation, reference
log-probs, preference training, evaluation again, REPORT.md), one resumable stage per module function.

Modules: config (sizes, full and --fast), stages (done.json markers), build (world, model), sft, evaluate,
preference, report, pipeline (`run_demo`).
"""

"""Sizes and knobs of `mllm demo`: one dataclass, with the full and the `--fast` settings.

The full settings were sized on a shared 2-core CPU to finish in about 15 minutes; `--fast` shrinks every stage so
the CI test (which asserts that the model learns) runs in a few minutes. Both use the same stages and code paths.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any


@dataclass
class DemoConfig:
    """Everything that decides what the demo computes. Stored in `demo_config.json`: a re-run with other values
    refuses to mix its results with the stored ones (pass another --out). A field added later defaults to what the
    demo did before it existed, so a folder made before it continues at that default (`stages.check_config`)."""

    out: Path = Path("runs/demo")
    """Output folder: one subfolder per stage, REPORT.md at the top."""
    seed: int = 0
    """Seed of the toy world, the model initialisation, training and sampling."""
    fast: bool = False
    """The CI-sized variant (recorded so a fast and a full run never share a folder)."""
    threads: int = 2
    """CPU threads in all: the training stages share them out over `processes`, the other stages use them in this
    process. On a shared 2-core machine more threads only add contention."""
    processes: int = 0
    """Processes of the training stages (`vision`, `align`, `sft`, `preference`), as `torchrun --nproc-per-node`
    would start them: each takes its share of every batch and the gradients are averaged (DDP), each with
    `threads // processes` threads. 0 (auto): one per thread on CPU, 1 on CUDA. On this 2-core CPU two processes of
    one thread made an SFT step 1.57x faster than one process of two threads (docs/LOG.md). Batch sizes must divide
    by it."""
    device: str = "auto"
    """Where training and evaluation run: "cpu", "cuda" (the first visible GPU; choose it with CUDA_VISIBLE_DEVICES)
    or "auto" (CUDA when torch sees a GPU). Figures differ between devices, so compare runs on one device."""
    vision_cache_mb: int = 0
    """`--vision-cache-mb` of the SFT stages (`align`, `questions`, `sft`) where they keep the tower frozen: its output
    per image computed once per process and reused (6,000 images take ~200 MB per process); 0: off. A training step
    whose images are all cached is ~1.17x faster (README, "Supervised fine-tuning"), but a step that runs the tower
    on some images alone rounds them differently (mllm.model.vision_cache), so a run with it is another draw of the
    demo, not the committed runs again: off by default (`--profile grounded_large` sets 400, and its committed runs
    were made with it). Like `processes`, not part of the run's fingerprint."""
    length_pieces: int = 1
    """`--length-pieces` of the SFT stages: each batch run as up to this many forwards on samples of similar length,
    each padded to its own longest (`mllm.data.sft.split_by_length`). The same loss and gradients up to rounding,
    so, like the vision cache, another draw of a committed run rather than the run again: 1 (off) by default
    (`--profile grounded_large` sets 2), and not part of the fingerprint. 2 pieces made a step of 32 items of the
    `questions` stage's file 1.21x faster and one of 16 mixed items 1.18x (side by side, one thread, float32;
    README, "Supervised fine-tuning")."""
    # --- toy world ---
    n_train: int = 6000
    """Training images (each gives 4 yes/no questions, 2-3 short-answer questions, 1 description and 1-4 REC
    records). With 2,000 the stages before the mixed SFT learnt the training images' answers more than the lookups
    (the `questions` stage's training loss 0.22, held-out yes/no 65.7%); with 6,000, at the same steps, the same
    stage's model answered 76.8% (pairs 60.0% against 35.3%), and after the mixed SFT 80.5% against 75.2% (seed 0,
    docs/LOG.md, 2026-12-05 (sixth session)). The world and the tokenization cost a few seconds more."""
    n_test: int = 300
    """Held-out images (yes/no test set, CHAIR bench, REC validation split)."""
    n_preference: int = 1000
    """Preference pairs (on the first training images)."""
    noise_rate: float = 0.15
    """Share of training descriptions that mention an absent object: the hallucination to fix."""
    max_objects: int = 4
    """Most objects per image (the toy world's `max_objects`, 1-4)."""
    train_yes_no_pairs: int = 2
    """Yes/no pairs per training image (the toy world's `train_yes_no_pairs`, 1-4)."""
    lookup_questions: bool = False
    """The toy world's `lookup_questions`: short-answer questions about the shapes present, the shape of an object
    named by its colour and the place of a named object, beside the colour, count and colour-of-a-shape ones."""
    min_object_size: int = 22
    """Smallest object side in pixels (the toy world's `min_object_size`)."""
    max_object_size: int = 34
    """Largest object side in pixels (the toy world's `max_object_size`; at most 53 for 4 objects in 112 px). Objects
    of 30-46 px gave better boxes (Acc@0.5 12.2% against 1.0% on CPU, 16.2% against 1.0% on a GPU) but no better
    answers or CHAIR, so the default stays (docs/LOG.md, 2026-11-27)."""
    # --- model ---
    default_system_prompt: bool = True
    """The toy tokenizer's chat template adds MiniCPM-V's default system message to every conversation (False: the
    same ChatML without it, 11 tokens less per sample)."""
    use_image_id: bool = True
    """The preset's `use_image_id` (`<image_id>0</image_id>` before each image, 3 tokens)."""
    rope_theta: float = 1000000.0
    """The preset's RoPE base (Qwen2's 1e6)."""
    vision_stem: str = "conv"
    """`vision_config.stem` of the preset: "conv" lets a tower trained from scratch learn positions. "cnn" (with
    patch_size 8, vision_layers 0, position_init_std 0) is the only tower here that learned the toy shapes under
    direct supervision, and trains faster, but behind the LLM it was read worse than "conv" (docs/LOG.md)."""
    patch_size: int = 14
    """Vision patch side (MiniCPM-V's 14); the "cnn" stem with 3 layers needs a multiple of 8."""
    vision_layers: int = 4
    """Vision transformer layers after the stem (0 is allowed: the stem and the patch projection alone)."""
    projector: str = "merge"
    """`projector` of the preset: "merge" (2x2 patch merge, what the from-scratch prototype used) keeps each image
    row tied to one region from the first step; at random init the resampler's queries read nearly one average."""
    query_num: int = 16
    """Image rows per image in the LLM prompt (the preset's `query_num`); "mlp" needs the token grid's size, e.g.
    49 for patch_size 16 on the 112-px images."""
    initializer_range: float = 0.08
    """Std of the random initial weights (the preset's `initializer_range`): 0.08 left the loss plateau where the
    model ignores the image sooner than 0.02 in the grounding engineer's from-scratch runs (docs/LOG.md)."""
    tie_word_embeddings: bool = True
    """The preset's `tie_word_embeddings` (Qwen2's small models tie too): image rows that learn to produce a colour
    word's output direction then also match that word's input embedding in a question. In probes it sped up the
    yes/no lookup (71% against 56.5% at the same step), in the demo yes/no 55.5% against 51.5% (docs/LOG.md,
    2026-11-27)."""
    position_init_std: float = 0.5
    """`vision_config.position_init_std`: a position table at the scale of the patch features finds places sooner
    with the "conv" stem; with the "cnn" stem use 0 (at 0.5 the random table swamped the shape features)."""
    normalize_image_rows: bool = True
    """The preset's `normalize_image_rows`: centre each image's rows and scale them to RMS 1, so the projector
    cannot turn them into one large constant vector (what it did in every from-scratch run here, docs/LOG.md)."""
    attn_implementation: str = "eager"
    """Attention of the training stages (`--attn-implementation`): "eager" or "sdpa". At the toy sizes (96 tokens,
    64-wide heads) PyTorch's CPU SDPA kernel spends most of an SFT step's attention time in its backward; eager made
    the steps 1.2x faster (docs/LOG.md, 2026-11-27 (CPU, processes)). Evaluation always uses SDPA."""
    # --- vision tower pretraining (per-token box labels, before any SFT) ---
    vision_steps: int = 800
    """Optimizer steps of the `vision` stage (`mllm train vision` on the world's COCO instances: every vision token
    learns the shape, colour and box of the object it lies on; 0 skips it). Without it the tower, trained through the
    LLM's loss alone, never told the shapes apart (docs/LOG.md, 2026-11-27)."""
    vision_batch_size: int = 16
    """Images per step of the `vision` stage."""
    vision_lr: float = 2e-3
    """Peak learning rate of the `vision` stage (cosine schedule after warm-up)."""
    vision_align_rows: bool = True
    """`--align-rows` of the `vision` stage: the projector learns, too, to point each image row at the LLM's input
    embeddings of the shape and colour names present in its region. With it the descriptions name the right objects
    (greedy CHAIRi 2.3 against 52.9 without, after the same SFT; docs/LOG.md, 2026-11-27 (night))."""
    vision_row_boxes: bool = False
    """`--row-boxes` of the `vision` stage: a linear head on each aligned row also predicts the box of the object
    covering most of its region, so that the frozen tower's rows carry where the objects are (a linear read-out of
    the aligned rows found the box at IoU >= 0.5 for 22% of the object cells without it; docs/LOG.md)."""
    vision_align_regions: bool = True
    """`--region-words` of the `vision` stage: each aligned row also points at the words of the image thirds
    ("top"/"middle"/"bottom", "left"/"center"/"right") its objects' centres lie in, the words the position
    questions and descriptions use, so that an object's rows say where it is (the LLM sees the rows' order only
    through RoPE distances, which vary with the question). Measured on seed 0: the rows of held-out objects point
    at their own thirds (98% / 97%), the tower's per-token box accuracy rose 61.8% -> 77.3%, and 300 SFT steps on
    the position questions alone reached 76.7% against 70.0% without it (docs/LOG.md)."""
    sft_tune_vision: bool | None = None
    """Train the vision tower in the SFT stages too (`--tune-vision`). None (the default): only when the `vision`
    stage is off. SFT at lr 1e-3 undid what the `vision` stage taught (greedy CHAIRi 57.6 with the tower trained,
    8.1 with it frozen; docs/LOG.md, 2026-11-27 (night))."""
    sft_tune_embeddings: bool = True
    """Train the LLM's (tied) token embeddings in the SFT stages (`--tune-embeddings`). Off keeps the word vectors
    that the `vision` stage aligned the image rows to."""
    sft_vision_lr: float | None = None
    """Peak learning rate of the vision tower in the SFT stages when it is trained there (`--vision-learning-rate`;
    None: `sft_lr`)."""

    # --- the first SFT stage (`align`: one kind of item alone, before the mixed SFT) ---
    align_steps: int = 300
    """Optimizer steps of a first SFT stage on the items `align_data` names (0 skips it; same batch size as SFT).
    The default trains the position yes/no questions first: alone they reach 77% in 300 steps of 32, while mixed with
    the other questions from the start they stayed at chance in every run (AUC 0.505 after 500 steps of 64; with
    this stage first 65-75%; docs/LOG.md, 2026-12-04 (issue 26, part 2)). With `align_data="descriptions"` it is
    LLaVA's caption-first curriculum, which slowed the yes/no lookup down here."""
    align_lr: float = 1e-3
    """Peak learning rate of the `align` stage (cosine schedule after warm-up)."""
    align_batch_size: int = 32
    """Samples per step of the `align` stage. 300 x 64 (with the mixed SFT at 1,100 x 32) lifted yes/no on seed 0
    from 75.2% to 78.5% and pair accuracy from 53.7% to 62.7%, but greedy CHAIRi rose from 4.9% to 12.4%, and the
    stage took about twice its 110 s (docs/LOG.md, 2026-12-05 (fifth session))."""
    align_data: str = "position"
    """What the `align` stage trains on: "descriptions" (the captions first, as LLaVA) or a yes/no category of
    the toy world ("position", "color", "count", "existence": that category's training questions first)."""
    # --- the second SFT stage (`questions`: every yes/no and short-answer question, before the mixed SFT) ---
    questions_steps: int = 500
    """Optimizer steps of an SFT stage on all the world's yes/no and short-answer questions (no descriptions, no
    boxes), after `align` and before the mixed SFT (0 skips it). The lookups of an object by the question's words
    form here more surely than in the mix: on seed 1, the mixed SFT straight after `align` left yes/no at 55.8%
    (colour 53%, existence 56%); with this stage first (500 x 64) 76.3% (colour 92%, existence 83%); over seeds 0-4
    72.4% (sd 9.6) -> 77.8% (sd 2.1), at the cost of 200 mixed steps (greedy CHAIRi 4.9 -> 8.7% on average;
    docs/LOG.md, 2026-12-05). 300 steps were not enough on seed 1 (63.0%)."""
    questions_batch_size: int = 64
    """Samples per step of the `questions` stage (0.43 s per step of 64 against 0.33 s per mixed step of 32 on the
    2 cores)."""
    questions_rec_repeats: int = 0
    """REC conversations in the `questions` stage's data beside the questions: every training REC record this many
    times, one-object ones twice as often, boxes in `rec_box_bins` steps (0: the questions alone). The box lookup
    then forms with the question lookups instead of after them: from seed 0's `align` model, 1,000 x 64 on the
    questions and 2 x the REC records (44% REC, 20 bins) gave Acc@0.5 15.25% and yes/no 75.2%, against 76.8% and
    no boxes for the questions alone at 500 x 64; the whole demo so (seed 0): Acc@0.5 12.75%, above every image-blind
    rule, but greedy CHAIRi 14.2% against 3.7% (docs/LOG.md, 2026-12-05 (seventh session)). Off in the recipe."""
    questions_description_repeats: int = 0
    """Times each training description appears in the `questions` stage's data (0: none, the questions and REC
    alone). With REC there, the descriptions of the later mixed SFT read the image less (greedy CHAIRi 14.2% on seed
    0); from seed 0's `align` model, the questions, 2 x REC and 2 x the descriptions (14% of 87,013 items) at
    1,000 x 64, then the mixed SFT (20 bins, descriptions x6): yes/no 81.8%, greedy CHAIRi 2.6%, Acc@0.5 14.0%
    (docs/LOG.md, 2026-12-05 (seventh session)). As whole demos (2 here with `questions_rec_repeats=2`,
    `rec_box_bins=20`, `description_repeats=6`, `questions_steps=1000`; seeds 0-4): boxes above every image-blind
    rule on each (Acc@0.5 12.0-18.0%), greedy CHAIRi 0.9-2.0%, but yes/no 79.3-86.5%, below 80% on three: not the
    recipe (docs/LOG.md, 2026-12-05 (eighth session)). A description in most batches pads them to its length: the
    stage's steps took ~1.4x as long."""
    questions_first_steps: int = 0
    """Steps (of `questions_batch_size`) on the yes/no and short-answer questions alone at the start of the
    `questions` stage, before its data with REC or descriptions (0: none). The recipe's `questions` stage then the
    candidate's above, 500 steps, seeds 0-2: yes/no 82.0 / 82.2 / 79.5% against 79.8 / 79.3 / 79.8%, Acc@0.5 10.25 /
    18.00 / 10.75% against 13.25 / 18.00 / 16.00%, the boxes no better than image-blind rules on seeds 0 and 2: not
    in `--profile grounded` (docs/LOG.md, 2026-12-06, ninth and tenth sessions)."""
    # --- SFT ---
    sft_steps: int = 1100
    """Optimizer steps of SFT on the mixed (yes/no + short answers + descriptions + REC) data; 0 skips it (the model
    "after SFT", evaluated and trained by preference, is then the last earlier stage's: in `--profile grounded` the
    `questions` model met every goal of issue 26 but grounding >= 30% on seeds 0, 2 and 3, not on seeds 1 and 4,
    yes/no 73.3 and 78.2%; docs/LOG.md 2026-12-06 (eleventh session)). 1,300 before the `questions` stage took
    ~220 s of the 15 minutes; at 1,000 (descriptions x3) the descriptions read the image less
    (greedy CHAIRi 10.6% on seed 0). With the earlier recipe (token loss, no position stage) more steps were the one
    lever that moved the yes/no answers (seed 0): 750 gave 54.0%, 1,200 58.3%, 1,300 59.3% (docs/LOG.md)."""
    sft_batch_size: int = 32
    """Samples per step. 750 x 32 against 1500 x 16 (the same samples, about the same time): Acc@0.5 9.2% against
    3.0% (docs/LOG.md, 2026-11-27)."""
    sft_lr: float = 1e-3
    """Peak learning rate of the mixed SFT (cosine schedule after warm-up). At 2e-3 the question answers dropped the
    image again in probes, and after `align` the mixed SFT forgot it (docs/LOG.md)."""
    sft_loss_reduction: str = "sample"
    """`--loss-reduction` of the SFT stages: "token" (every target token weighs the same) or "sample" (every
    conversation weighs the same). With "token" a one-word yes/no answer is ~6% of a mixed batch's loss (the
    descriptions and boxes have most of the tokens); "sample" lifted yes/no from 59.3% to 77.7% and pair accuracy
    from 24% to 60% with the other changes of 2026-12-04 (seed 0; docs/LOG.md)."""
    bf16: bool | None = None
    """Run the `vision`, `align`, `questions` and `sft` stages under bfloat16 autocast (Trainer's `--bf16`; weights,
    optimizer and losses stay float32). None (the default): where the device has a bfloat16 path (`native_bf16`: a
    CUDA GPU that supports it, a CPU for which oneDNN has one: AVX-512, avx512_bf16, AMX, ARM BF16), float32
    elsewhere. On a CPU with avx512_bf16, SFT steps ran 1.3x faster alone on 2 threads (1.6x at 1 thread beside
    another run) with the same figures after SFT (docs/LOG.md, 2026-11-27 (GPU, second)); on an AVX2-only CPU (AMD
    EPYC, 2026-12-05) autocast fell back to a slow path and a `vision` step took 2.5 s against 0.35 s in float32. The
    resolved value is what the run folder records. Preference training stays float32, like the reference log-probs
    it compares with."""
    sft_group_by_length: bool = False
    """Batch SFT samples of similar length together (`--train-sampling-strategy group_by_length`; about a third of a
    random batch's tokens are padding). Off: with batches that hold one kind of question each, the model stopped
    reading the image (greedy CHAIRi 65.1 against 1.8, yes/no 50.0%; docs/LOG.md, 2026-11-27 (GPU, second))."""
    rec_fraction: float = 0.6
    """Share of the REC records of images with several objects (one record per object) in the mixed SFT file."""
    rec_box_bins: int = 0
    """Boxes of the REC answers snapped to this many steps of the image side (`prepare-grounding --box-bins`; 0:
    the exact boxes). The held-out boxes the model is scored against stay exact. In a REC-only probe from the same
    model (seed 0, 1,200 x 32) 20 bins reached Acc@0.5 26.5% against 19.75% with the exact boxes (McNemar p 0.010;
    docs/LOG.md, 2026-12-05 (fifth session))."""
    rec_single_repeats: int = 8
    """Times each REC record of a one-object image appears in the mixed SFT file. A box that follows from the image
    alone is learnt first and leads the way to boxes that need the expression (docs/LOG.md)."""
    description_repeats: int = 4
    """Times each training description appears in the mixed SFT file. With `sft_loss_reduction="sample"` a
    45-token description weighs as much as a one-word answer, and the descriptions stopped reading the image at 1
    (greedy CHAIRi 50.6%); 3 with 1,300 mixed steps, 4 with the 1,100 left after the `questions` stage (docs/LOG.md)."""
    sft_save_steps: int = 100
    """Checkpoint interval: an interrupted SFT resumes from the latest checkpoint."""
    sft_interrupt_after: int | None = None
    """Testing hook: stop the process (raise `DemoInterrupted`) right after the checkpoint of this step is saved,
    as a kill would. Not a command-line flag."""
    # --- evaluation ---
    eval_yes_no: int = 600
    """Yes/no test questions answered (greedy)."""
    eval_chair: int = 300
    """objhal bench images described for CHAIR."""
    chair_samples: int = 2
    """Sampled descriptions per image (temperature 1, fixed seeds) besides the greedy one."""
    eval_grounding: int = 400
    """REC validation expressions grounded (greedy)."""
    eval_batch_size: int = 32
    """Prompts per generate call."""
    max_new_tokens: int = 64
    """Longest description; toy descriptions need about 45 tokens."""
    # --- preference ---
    preference_steps: int = 240
    """Optimizer steps of preference training. 240 against 120 after the same SFT: CHAIRi greedy 58.6 -> 54.2 and
    sampled 58.9 -> 57.1 against 58.6 -> 60.2 and 58.9 -> 59.7 (docs/LOG.md, 2026-11-27)."""
    preference_batch_size: int = 8
    """Pairs per step."""
    preference_lr: float = 5e-5
    """Learning rate (constant after warm-up)."""
    preference_beta: float = 0.5
    """beta of the reward; 0.1 damaged grounding in the feasibility run."""
    preference_loss: str = "nca_pair"
    """Pair loss (the exercise's loss is NCA)."""
    preference_tune_resampler: bool = True
    """Train the resampler in preference training, beside the LLM (the vision tower stays frozen). The preference
    pairs are descriptions; the resampler's queries are what every answer reads the image through, the boxes too.
    Off did not keep the boxes that preference training costs a model that grounds: on the candidate with REC and
    descriptions in the `questions` stage, Acc@0.5 13.25 -> 10.25% (seed 0) and 18.0 -> 14.75% (seed 1), against
    10.0 and 14.75% with it on (docs/LOG.md, 2026-12-05 (eighth session))."""
    preference_tune_embeddings: bool = True
    """Train the LLM's token embeddings in preference training (with the tied output layer: every token's logit,
    the box digits' too). Off: the same loss of boxes as on (seed 0 of the candidate above: 13.25 -> 10.0%)."""
    preference_replay_rec: float = 0.0
    """Weight of a replay of the REC conversations of the mixed SFT file during preference training (`mllm train
    preference --replay-data`, as many conversations per step as pairs); 0: off. The pairs are descriptions, and
    nothing in them keeps the boxes the SFT taught."""

    def validate(self) -> None:
        """Reject values that would fail deep inside a stage, naming the field."""
        for name in ("n_train", "n_test", "sft_batch_size", "sft_save_steps", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo {name} must be at least 1, got {getattr(self, name)}")
        for name in (
            "align_steps",
            "questions_steps",
            "sft_steps",
            "vision_steps",
            "eval_yes_no",
            "eval_chair",
            "chair_samples",
            "eval_grounding",
            "preference_steps",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"demo {name} must be >= 0, got {getattr(self, name)}")
        if self.query_num < 1:
            raise ValueError(f"demo query_num must be at least 1, got {self.query_num}")
        if self.preference_replay_rec < 0:
            raise ValueError(f"demo preference_replay_rec must be >= 0, got {self.preference_replay_rec}")
        if self.vision_layers < 0 or self.patch_size < 1:
            raise ValueError(
                f"demo vision_layers must be >= 0 and patch_size >= 1, got {self.vision_layers} and {self.patch_size}"
            )
        from mllm.train.losses import SFT_LOSS_REDUCTIONS

        if self.sft_loss_reduction not in SFT_LOSS_REDUCTIONS:
            raise ValueError(
                f"demo sft_loss_reduction must be one of {SFT_LOSS_REDUCTIONS}, got {self.sft_loss_reduction!r}"
            )
        from mllm.toy.world import QUESTION_TYPES

        align_data = ("descriptions", *QUESTION_TYPES)
        if self.align_data not in align_data:
            raise ValueError(f"demo align_data must be one of {align_data}, got {self.align_data!r}")
        if not 0.0 <= self.rec_fraction <= 1.0:
            raise ValueError(f"demo rec_fraction must be in [0, 1], got {self.rec_fraction}")
        if self.description_repeats < 1:
            raise ValueError(f"demo description_repeats must be at least 1, got {self.description_repeats}")
        if self.rec_single_repeats < 0:
            raise ValueError(f"demo rec_single_repeats must be >= 0, got {self.rec_single_repeats}")
        for name in ("questions_rec_repeats", "questions_description_repeats", "questions_first_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"demo {name} must be >= 0, got {getattr(self, name)}")
            if getattr(self, name) and self.questions_steps == 0:
                raise ValueError(
                    f"demo {name} adds to the questions stage's data, which questions_steps=0 skips"
                )
        if self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.attn_implementation not in ("eager", "sdpa"):
            raise ValueError(
                f"demo attn_implementation must be eager or sdpa, got {self.attn_implementation!r}"
            )
        if self.length_pieces < 1:
            raise ValueError(f"demo length_pieces must be at least 1 (1: off), got {self.length_pieces}")
        if self.vision_cache_mb < 0:
            raise ValueError(f"demo vision_cache_mb must be >= 0 (0: off), got {self.vision_cache_mb}")
        if self.processes < 0:
            raise ValueError(f"--processes must be >= 0 (0: automatic), got {self.processes}")
        processes = self.training_processes()
        if processes > 1 and self.torch_device() == "cuda":
            import torch

            if processes > torch.cuda.device_count():
                raise ValueError(
                    f"--processes {processes} on CUDA needs a GPU per process; torch sees {torch.cuda.device_count()}"
                )
        for name, steps in (
            ("vision_batch_size", "vision_steps"),
            ("align_batch_size", "align_steps"),
            ("questions_batch_size", "questions_steps"),
        ):
            if getattr(self, steps) > 0 and getattr(self, name) < 1:
                raise ValueError(f"demo {name} must be at least 1, got {getattr(self, name)}")
        if self.rec_box_bins < 0:
            raise ValueError(f"demo rec_box_bins must be >= 0 (0: the exact boxes), got {self.rec_box_bins}")
        for name in (
            "vision_batch_size",
            "align_batch_size",
            "questions_batch_size",
            "sft_batch_size",
            "preference_batch_size",
        ):
            if getattr(self, name) % processes:
                raise ValueError(
                    f"demo {name} ({getattr(self, name)}) must divide by the {processes} training processes"
                )
        if self.sft_interrupt_after is not None and not 0 < self.sft_interrupt_after < self.sft_steps:
            raise ValueError(f"sft_interrupt_after must be in 1..sft_steps-1, got {self.sft_interrupt_after}")

    def tunes_vision_in_sft(self) -> bool:
        """`sft_tune_vision` resolved."""
        return self.vision_steps == 0 if self.sft_tune_vision is None else self.sft_tune_vision

    def training_processes(self) -> int:
        """`processes` resolved (0: `threads` on CPU, 1 on CUDA)."""
        if self.processes:
            return self.processes
        return 1 if self.torch_device() == "cuda" else self.threads

    def threads_per_process(self) -> int:
        """torch threads of each training process."""
        return max(1, self.threads // self.training_processes())

    def torch_device(self) -> str:
        """The device that `device` names here ("auto" resolved)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def uses_bf16(self) -> bool:
        """`bf16` resolved (None: `native_bf16` of the device)."""
        return native_bf16(self.torch_device()) if self.bf16 is None else self.bf16

    def training_precision(self) -> str:
        """How the training stages compute, in words: "bfloat16 autocast" or "float32"."""
        return "bfloat16 autocast" if self.uses_bf16() else "float32"

    def fingerprint(self) -> dict[str, Any]:
        """The fields that decide results (not where they go, how many threads or processes compute them, or test
        hooks), with `bf16` resolved: a folder started with autocast is not continued without it."""
        skip = {
            "out",
            "threads",
            "processes",
            "device",
            "vision_cache_mb",
            "length_pieces",
            "sft_interrupt_after",
        }
        found = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {**found, "bf16": self.uses_bf16()}


def native_bf16(device: str) -> bool:
    """Whether `device` ("cpu" or "cuda") has a fast bfloat16 path: a CUDA GPU that supports it (Ampere and later),
    or a CPU for which oneDNN has bfloat16 kernels (AVX-512 BW/VL/DQ, avx512_bf16 or AMX on x86; BF16 on ARM), the
    check PyTorch's own mkldnn tests use (a private op: where a PyTorch build lacks it, float32, which is always
    right). Elsewhere bfloat16 autocast is much slower than float32."""
    import torch

    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


FAST_OVERRIDES: dict[str, Any] = {
    "fast": True,
    "n_train": 800,
    "n_test": 100,
    "n_preference": 320,
    "align_steps": 100,
    "questions_steps": 50,
    "sft_steps": 250,
    "sft_save_steps": 50,
    "eval_yes_no": 200,
    "eval_chair": 100,
    "chair_samples": 2,
    "eval_grounding": 150,
    "preference_steps": 40,
    "bf16": False,
}
"""The `--fast` variant for CI; the thresholds of tests/test_demo.py were measured with these values. It keeps
float32: with bfloat16 autocast its 150 SFT steps read the image less (greedy CHAIRi 46.7% against 37.0-38.1%, too
near the test's 50%) and saved ~40 s."""


GROUNDED: dict[str, Any] = {
    "questions_steps": 1000,
    "questions_rec_repeats": 2,
    "questions_description_repeats": 2,
    "rec_box_bins": 20,
    "description_repeats": 6,
    "preference_replay_rec": 1.0,
}
"""The "grounded" profile: the questions, REC (boxes in 20 bins) and the descriptions in a longer `questions`
stage, the descriptions x6 in the mixed SFT, and the REC conversations replayed during preference training."""

PROFILES: dict[str, dict[str, Any]] = {
    "recipe": {},
    "grounded": GROUNDED,
    "grounded_large": {
        **GROUNDED,
        "min_object_size": 30,
        "max_object_size": 46,
        "max_objects": 3,
        "default_system_prompt": False,
        "use_image_id": False,
        "length_pieces": 2,
        "vision_cache_mb": 400,
    },
}
"""Named settings of `mllm demo --profile`. "recipe" (the default) is the 15-minute demo, whose boxes are no better
than image-blind rules. "grounded" (`GROUNDED`) trains the boxes too; its boxes beat every image-blind rule on seeds
0-4, in about 25 minutes on 2 cores (README, "The toy-world demo";
docs/results/demo_probes/2026-12-06-amx/candidate_replay_seed<N>.json), but at Acc@0.5 15% on average.
"grounded_large" is that profile in a world of fewer, larger objects (30-46 px instead of 22-34, at most 3 per
image instead of 4), a change of the world's difficulty, with the speed levers: prompts without the system message
and the image id, batches in 2 pieces of similar length and the frozen tower's rows cached. Every goal of issue 26 but
the time on seeds 0-4 (Acc@0.5 30.0-37.0% after SFT, 15-20 points above the best image-blind box rule), in about
31 minutes of stages on a 2-core AVX2 EPYC (README; docs/results/demo_probes/2026-12-06-epyc/
grounded_large_levers_seed<N>.json)."""

CLI_FIELDS = {"out", "seed", "fast", "threads", "processes", "device"}
"""Fields with a flag of their own in `mllm demo`; `--set` refuses them."""
TEST_HOOKS = {"sft_interrupt_after"}
"""Fields that only tests set; `--set` refuses them."""

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_setting(text: str) -> tuple[str, Any]:
    """`FIELD=VALUE` of `mllm demo --set` -> (field, value), the value read as the field's type (bool: true/false,
    int, float, str; "none" where the field may be None). Raises ValueError naming the flag."""
    name, sep, raw = text.partition("=")
    name, raw = name.strip(), raw.strip()
    kinds = {f.name: str(f.type) for f in fields(DemoConfig)}
    if not sep or name not in kinds or name in TEST_HOOKS:
        known = sorted(set(kinds) - CLI_FIELDS - TEST_HOOKS)
        raise ValueError(f"--set {text!r}: expected FIELD=VALUE with FIELD one of {known}")
    if name in CLI_FIELDS:
        raise ValueError(f"--set {text!r}: {name} has a flag of its own (--{name})")
    kind = kinds[name]
    if raw.lower() in ("none", "null") and "None" in kind:
        return name, None
    base = kind.replace("| None", "").strip()
    try:
        if base == "bool":
            if raw.lower() not in _TRUE | _FALSE:
                raise ValueError("not a boolean")
            return name, raw.lower() in _TRUE
        if base in ("int", "float"):
            return name, int(raw) if base == "int" else float(raw)
    except ValueError:
        raise ValueError(f"--set {text!r}: {name} takes values of type {kind}, got {raw!r}") from None
    return name, raw


def demo_config(
    out: str | Path = "runs/demo",
    fast: bool = False,
    seed: int = 0,
    profile: str = "recipe",
    **overrides: Any,
) -> DemoConfig:
    """The full (or `fast`) configuration of a named `profile` (`PROFILES`) with keyword overrides of any
    `DemoConfig` field."""
    known = {f.name for f in fields(DemoConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown demo option(s) {unknown}; known: {sorted(known)}")
    if profile not in PROFILES:
        raise ValueError(f"--profile {profile!r}: expected one of {sorted(PROFILES)}")
    if fast and PROFILES[profile]:
        raise ValueError(f"--fast and --profile {profile}: the CI-sized run has the recipe's settings only")
    config = DemoConfig(out=Path(out), seed=seed)
    if fast:
        config = replace(config, **FAST_OVERRIDES)
    config = replace(config, **PROFILES[profile])
    config = replace(config, **overrides)
    config.validate()
    return config

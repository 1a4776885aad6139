"""Time CHAIR scoring of 300 detailed captions once the ground truth is loaded (target: under 2 s).

Usage: OMP_NUM_THREADS=1 python benchmarks/chair_speed.py [--nltk-data ../shared/nltk_data] [--cache chair_tiny.pkl]

The captions are synthetic (seeded), about 125 tokens each like objhal_bench answers, spread over the images of the
ground truth. "load" is the ground truth plus the NLP backend (NLTK's tagger and WordNet, about 3 s); "first pass" is the
scoring time asked for, "warm pass" a second scoring with the lemma cache filled.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

SENTENCES = [
    "The image shows a man sitting on a couch with his dog while a cat sleeps on the chair.",
    "A woman in a red coat is riding a bicycle down a busy city street lined with parked cars.",
    "On the dining table there are several cups, a bottle of wine, two wine glasses and a bowl of oranges.",
    "In the background, a clock tower rises above the buildings and a traffic light glows green.",
    "Two children are playing with a frisbee in the park, and a baby bird watches from a bench.",
    "The kitchen has a stainless steel refrigerator, a microwave above the oven, and a sink full of dishes.",
    "A teddy bear lies on the bed next to a stack of books and a laptop computer.",
    "Several people wait at the bus stop while a passenger train passes on the bridge behind them.",
    "A man is talking on his cell phone near a fire hydrant, holding an umbrella in his other hand.",
    "The bathroom is clean, with a white toilet, a small sink and a potted plant on the window sill.",
    "Hot dogs and sandwiches are served on plates, with knives and forks placed beside them.",
    "Overall, the scene conveys a calm and relaxed atmosphere on a sunny afternoon.",
]


def make_captions(image_ids: list[int], count: int, seed: int = 0) -> list[tuple[int, str]]:
    """`count` captions of seven random sentences each, assigned to the ground-truth images in turn."""
    rng = random.Random(seed)
    return [(image_ids[i % len(image_ids)], " ".join(rng.choices(SENTENCES, k=7))) for i in range(count)]


def time_backend(nlp: str, cache: Path, captions: list[tuple[int, str]]) -> tuple[float, float, float, float]:
    """Wall seconds to load, to score the captions (first pass, and its CPU seconds), and to score them again."""
    from mllm.eval.chair import load_evaluator

    start = time.perf_counter()
    evaluator = load_evaluator(cache=cache, nlp=nlp)
    loaded = time.perf_counter()
    cpu_start = time.process_time()
    first = evaluator.compute(captions)
    first_done = time.perf_counter()
    first_cpu = time.process_time() - cpu_start
    evaluator.compute(captions)
    warm_done = time.perf_counter()
    assert len(first["sentences"]) == len(captions)
    return loaded - start, first_done - loaded, first_cpu, warm_done - first_done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nltk-data", type=Path, default=SHARED / "nltk_data")
    parser.add_argument("--cache", type=Path, default=SHARED / "fixtures" / "chair" / "chair_tiny.pkl")
    parser.add_argument("--captions", type=int, default=300)
    args = parser.parse_args()

    import nltk

    nltk.data.path.insert(0, str(args.nltk_data))
    from mllm.eval.chair import load_evaluator

    image_ids = sorted(load_evaluator(cache=args.cache, nlp="builtin").imid_to_objects)
    captions = make_captions(image_ids, args.captions)
    tokens = sum(len(nltk.word_tokenize(caption.lower())) for _, caption in captions) / len(captions)
    print(f"{len(captions)} captions, {tokens:.0f} tokens each on average")
    for nlp in ("nltk", "builtin"):
        load_s, first_s, first_cpu, warm_s = time_backend(nlp, args.cache, captions)
        print(
            f"--nlp {nlp:8s} load {load_s:.2f} s | first pass {first_s:.2f} s wall, {first_cpu:.2f} s CPU"
            f" | warm pass {warm_s:.2f} s"
        )


if __name__ == "__main__":
    main()

"""The CHAIR object-hallucination metric (Rohrbach et al., 2018), computed exactly as the reference script does.

The reference is LisaAnne/Hallucination `chair.py` as modified for the exercise (WordNet POS lemmatizer, Recall and
Len, pickle cache). A caption is lemmatized (see `chair_nlp`), two-word phrases are merged ("hot dog", "baby bird" ->
"bird"), tokens that are object synonyms are mapped to their node word, and each mention whose node word is not in
the image's ground truth is a hallucination. Ground truth = node words of the COCO instance annotations plus node
words found in the image's COCO reference captions.

Metrics: CHAIRs = captions with a hallucination / captions; CHAIRi = hallucinated mentions / object mentions;
Recall = ground-truth objects mentioned / ground-truth objects (summed over captions); Len = 0.01 x mean tokens.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mllm.eval.chair_nlp import CaptionLemmatizer, make_lemmatizer
from mllm.files import write_json_atomic

logger = logging.getLogger(__name__)

CACHE_FORMAT = "mllm.chair.ground_truth"
CACHE_VERSION = 1
COCO_VOCABULARY = "coco"
ANNOTATION_FILES = (
    "instances_val2014.json",
    "instances_train2014.json",
    "captions_val2014.json",
    "captions_train2014.json",
)

# The reference's hard-coded MS-COCO rules. Two-word phrases merged into one token (only pairs are merged, so the
# three-word "stove top oven" never fires, as in the reference).
COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)  # fmt: skip
# "baby bird" is a bird, not a person ("baby" is a person synonym); likewise "adult".
COCO_ANIMAL_WORDS = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub",
)  # fmt: skip
# "passenger jet" is a jet, not a person.
COCO_VEHICLE_WORDS = ("jet", "train")
COCO_SPECIAL_PHRASES = {"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}


@dataclass(frozen=True)
class Vocabulary:
    """An object vocabulary: synonym -> node word, the phrases merged into one token, and its provenance."""

    inverse_synonyms: dict[str, str]
    double_words: dict[str, str]
    coco_rules: bool  # the toilet-seat rule; only meaningful for the COCO list
    source: str  # "coco" or the synonyms file
    digest: str  # sha256 of the synonym text, to tie caches to the vocabulary that built them
    object_words: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "object_words", frozenset(self.inverse_synonyms))

    @property
    def node_words(self) -> frozenset[str]:
        return frozenset(self.inverse_synonyms.values())

    def single_words(self) -> set[str]:
        """Every word that appears in a synonym or merged phrase (what the builtin backend may singularize to)."""
        words = set()
        for phrase in list(self.inverse_synonyms) + list(self.double_words):
            words.update(phrase.split())
        return words


def parse_synonyms(text: str, source: str) -> list[list[str]]:
    """Split a synonyms text into lines of [node word, synonym, ...], like the reference (`strip().split(", ")`).

    Blank lines and lines starting with '#' are skipped. Entries are not stripped further: the reference keeps a
    stray leading space in two COCO entries, and so do we.
    """
    groups = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        group = line.split(", ")
        if any(not word.strip() for word in group):
            raise ValueError(f"{source}:{line_no}: empty synonym in line {line!r}")
        groups.append(group)
    if not groups:
        raise ValueError(f"{source}: no synonym lines found")
    return groups


def load_vocabulary(synonyms: str | os.PathLike | None = None) -> Vocabulary:
    """The COCO vocabulary (`synonyms=None`) or one read from a synonyms file in the reference's format."""
    if synonyms is None:
        text = resources.files("mllm.eval").joinpath("coco_synonyms.txt").read_text(encoding="utf-8")
        source = COCO_VOCABULARY
    else:
        path = Path(synonyms)
        if not path.is_file():
            raise ValueError(f"--synonyms: file not found: {path}")
        text = path.read_text(encoding="utf-8")
        source = str(path)
    groups = parse_synonyms(text, source)
    inverse = {}
    for group in groups:
        for word in group:
            inverse[word] = group[0]
    is_coco = synonyms is None
    double_words = _coco_double_words() if is_coco else _custom_double_words(inverse, source)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Vocabulary(inverse, double_words, coco_rules=is_coco, source=source, digest=digest)


def _coco_double_words() -> dict[str, str]:
    """The reference's double-word table for COCO (same keys and values as its pickled `double_word_dict`)."""
    table = {phrase: phrase for phrase in COCO_DOUBLE_WORDS}
    for animal in COCO_ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in COCO_VEHICLE_WORDS:
        table[f"passenger {vehicle}"] = vehicle
    table.update(COCO_SPECIAL_PHRASES)
    return table


def _custom_double_words(inverse: dict[str, str], source: str) -> dict[str, str]:
    """For another vocabulary, every two-word synonym is merged into one token (only pairs, like the reference)."""
    table = {}
    for word in inverse:
        parts = word.split()
        if len(parts) == 2:
            table[" ".join(parts)] = word
        elif len(parts) > 2:
            logger.warning(
                "%s: %r has more than two words; CHAIR merges only word pairs, so it never matches",
                source,
                word,
            )
    return table


@dataclass
class CaptionWords:
    """What CHAIR finds in one caption."""

    words: list[str]  # object synonyms as they appear (after merging)
    node_words: list[str]  # their node words
    idxs: list[int]  # token index (before merging) of each, with the reference's toilet-seat quirk
    tokens: list[str]  # all lemma tokens after merging; their count is the caption length


class CHAIREvaluator:
    """Scores captions against per-image ground-truth node words; holds no file state, so it can score in memory."""

    def __init__(
        self,
        imid_to_objects: dict[int, set[str]],
        vocabulary: Vocabulary,
        lemmatizer: CaptionLemmatizer,
        ground_truth_info: dict[str, Any] | None = None,
    ) -> None:
        self.imid_to_objects = imid_to_objects
        self.vocabulary = vocabulary
        self.lemmatizer = lemmatizer
        self.ground_truth_info = ground_truth_info or {}

    def caption_to_words(self, caption: str) -> CaptionWords:
        """Object mentions of a caption, reproducing the reference step by step."""
        lemmas = self.lemmatizer.lemmatize(caption)
        tokens, starts = merge_double_words(lemmas, self.vocabulary.double_words)
        kept = tokens
        if self.vocabulary.coco_rules and "toilet" in tokens and "seat" in tokens:
            # A toilet seat is not a chair. The reference drops "seat" *before* it pairs tokens with indices, so
            # later indices shift by one; kept as is so that `hallucination_idxs` match the reference.
            kept = [word for word in tokens if word != "seat"]
        objects = self.vocabulary.object_words
        idxs = [starts[k] for k, word in enumerate(kept) if word in objects]
        words = [word for word in kept if word in objects]
        node_words = [self.vocabulary.inverse_synonyms[word] for word in words]
        return CaptionWords(words, node_words, idxs, tokens)

    def compute(self, captions: list[tuple[int, str]]) -> dict[str, Any]:
        """CHAIR over `(image_id, caption)` pairs: {"sentences": per-caption details, "overall_metrics": ...}."""
        if not captions:
            raise ValueError("CHAIR needs at least one caption")
        totals = collections.Counter()
        sentences = []
        for position, (image_id, caption) in enumerate(captions):
            if image_id not in self.imid_to_objects:
                raise ValueError(f"caption {position}: image id {image_id} has no ground truth")
            sentence = self._score_caption(image_id, caption, totals)
            sentences.append(sentence)
        overall = {
            "CHAIRs": totals["hallucinated_captions"] / totals["captions"],
            "CHAIRi": _ratio(totals["hallucinated_words"], totals["object_words"]),
            "Recall": _ratio(totals["recalled_objects"], totals["gt_objects"]),
            "Len": 0.01 * totals["tokens"] / totals["captions"],
        }
        return {"sentences": sentences, "overall_metrics": overall}

    def _score_caption(self, image_id: int, caption: str, totals: collections.Counter) -> dict[str, Any]:
        """One caption's details (fields named as in the reference output) and its share of the totals."""
        found = self.caption_to_words(caption)
        gt_objects = self.imid_to_objects[image_id]
        hallucinated, hallucination_idxs, recalled = [], [], set()
        for word, node_word, idx in zip(found.words, found.node_words, found.idxs):
            if node_word in gt_objects:
                recalled.add(node_word)
            else:
                hallucinated.append([word, node_word])
                hallucination_idxs.append(idx)
        totals["captions"] += 1
        totals["hallucinated_captions"] += int(bool(hallucinated))
        totals["hallucinated_words"] += len(hallucinated)
        totals["object_words"] += len(found.node_words)
        totals["recalled_objects"] += len(recalled)
        totals["gt_objects"] += len(gt_objects)
        totals["tokens"] += len(found.tokens)
        metrics = {
            "CHAIRs": int(bool(hallucinated)),
            "CHAIRi": _ratio(len(hallucinated), len(found.words)),
            "Recall": _ratio(len(recalled), len(gt_objects)),
            "Len": 0.0,  # the reference leaves the per-caption Len at 0; the overall Len is the real one
        }
        return {
            "image_id": image_id,
            "caption": caption,
            "mscoco_hallucinated_words": hallucinated,
            "mscoco_gt_words": sorted(gt_objects),
            "mscoco_generated_words": found.node_words,
            "hallucination_idxs": hallucination_idxs,
            "words": found.tokens,
            "metrics": metrics,
        }


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def merge_double_words(lemmas: list[str], double_words: dict[str, str]) -> tuple[list[str], list[int]]:
    """Merge listed word pairs into one token; returns the tokens and the index of each token's first lemma."""
    tokens, starts = [], []
    i = 0
    while i < len(lemmas):
        starts.append(i)
        pair = " ".join(lemmas[i : i + 2])
        if pair in double_words:
            tokens.append(double_words[pair])
            i += 2
        else:
            tokens.append(lemmas[i])
            i += 1
    return tokens, starts


# ---------------------------------------------------------------------------------------------------------------
# Ground truth: COCO annotation files, our JSON cache, or the reference's pickled evaluator.


def resolve_annotation_dir(coco_path: str | os.PathLike) -> Path:
    """The folder holding the four COCO 2014 files: `coco_path` itself or its `annotations/` subfolder."""
    root = Path(coco_path)
    for candidate in (root, root / "annotations"):
        if all((candidate / name).is_file() for name in ANNOTATION_FILES):
            return candidate
    raise ValueError(
        f"--coco-path {root}: expected {', '.join(ANNOTATION_FILES)} in it or in its annotations/ subfolder"
    )


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from error


def build_ground_truth(
    annotation_dir: Path, vocabulary: Vocabulary, lemmatizer: CaptionLemmatizer
) -> dict[int, set[str]]:
    """Node words per image from COCO instances (category names) and from the COCO reference captions."""
    imid_to_objects: dict[int, set[str]] = collections.defaultdict(set)
    for split in ("val", "train"):
        path = annotation_dir / f"instances_{split}2014.json"
        try:
            _add_instance_objects(_read_json(path), vocabulary, imid_to_objects)
        except KeyError as error:
            raise ValueError(f"{path}: missing field {error} in a COCO instances file") from error
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
    evaluator = CHAIREvaluator({}, vocabulary, lemmatizer)
    for split in ("val", "train"):
        path = annotation_dir / f"captions_{split}2014.json"
        try:
            annotations = _read_json(path)["annotations"]
            logger.info("CHAIR ground truth: reading %d captions of %s", len(annotations), path.name)
            for annotation in annotations:
                found = evaluator.caption_to_words(annotation["caption"])
                imid_to_objects[annotation["image_id"]].update(found.node_words)
        except KeyError as error:
            raise ValueError(f"{path}: missing field {error} in a COCO captions file") from error
    return dict(imid_to_objects)


def _add_instance_objects(data: dict, vocabulary: Vocabulary, imid_to_objects: dict[int, set[str]]) -> None:
    """Node word of every instance annotation's category, per image."""
    id_to_name = {category["id"]: category["name"] for category in data["categories"]}
    for annotation in data["annotations"]:
        name = id_to_name[annotation["category_id"]]
        if name not in vocabulary.inverse_synonyms:
            raise ValueError(f"category {name!r} is not in the vocabulary {vocabulary.source}")
        imid_to_objects[annotation["image_id"]].add(vocabulary.inverse_synonyms[name])


def annotation_stamp(annotation_dir: Path) -> dict[str, dict[str, int]]:
    """Size and modification time (ns) of each COCO annotation file: a cache built from other contents is stale."""
    stamp = {}
    for name in ANNOTATION_FILES:
        info = (annotation_dir / name).stat()
        stamp[name] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    return stamp


def default_cache_path(annotation_dir: Path, vocabulary: Vocabulary, backend: str) -> Path:
    """Where ground truth built from `annotation_dir` is cached when no --cache is given (user cache folder); the
    key covers the folder, the files' sizes and modification times, the vocabulary and the NLP backend."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mllm" / "chair"
    stamp = json.dumps(annotation_stamp(annotation_dir), sort_keys=True)
    text = f"{annotation_dir.resolve()}|{stamp}|{vocabulary.digest}|{backend}"
    return base / f"ground_truth_{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"


def save_ground_truth_cache(
    path: Path,
    imid_to_objects: dict[int, set[str]],
    vocabulary: Vocabulary,
    backend: str,
    coco_path: str,
    stamp: dict[str, dict[str, int]] | None = None,
) -> None:
    """Write the ground truth as JSON, atomically (a temporary file renamed over the target), with the
    annotation files' `stamp` it was built from."""
    payload = {
        "annotations": stamp,
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "nlp_backend": backend,
        "vocabulary": vocabulary.source,
        "vocabulary_sha256": vocabulary.digest,
        "coco_path": coco_path,
        "imid_to_objects": {str(imid): sorted(objects) for imid, objects in sorted(imid_to_objects.items())},
    }
    write_json_atomic(path, payload, indent=None)


def _cache_is_fresh(path: Path, annotation_dir: Path) -> bool:
    """Whether our JSON cache was built from the annotation files as they are now (sizes and mtimes)."""
    data = _read_json(path)
    stamp = json.loads(json.dumps(annotation_stamp(annotation_dir)))
    return isinstance(data, dict) and data.get("annotations") == stamp


def load_ground_truth_cache(path: Path, vocabulary: Vocabulary, backend: str) -> dict[int, set[str]]:
    """Read a JSON cache written by `save_ground_truth_cache`, refusing one made for another vocabulary/backend."""
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise ValueError(f"--cache {path}: not a CHAIR ground-truth cache (no format {CACHE_FORMAT!r})")
    if data.get("version") != CACHE_VERSION:
        raise ValueError(
            f"--cache {path}: cache version {data.get('version')} is not {CACHE_VERSION}; delete it"
        )
    if data.get("vocabulary_sha256") != vocabulary.digest:
        raise ValueError(
            f"--cache {path}: built for vocabulary {data.get('vocabulary')!r}, not {vocabulary.source!r}; "
            "use another --cache path or delete it"
        )
    if data.get("nlp_backend") != backend:
        raise ValueError(
            f"--cache {path}: built with --nlp {data.get('nlp_backend')}, not {backend}; use another --cache path"
        )
    return {int(imid): set(objects) for imid, objects in data["imid_to_objects"].items()}


class _ReferenceCHAIRState:
    """Stands in for the reference's `CHAIR` class when its pickle is read: it only keeps the pickled state."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"CHAIR state must be a dict, got {type(state).__name__}")
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the few names the reference's evaluator pickle uses, so a pickle cannot run code."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("__main__", "CHAIR"): _ReferenceCHAIRState,
        ("chair", "CHAIR"): _ReferenceCHAIRState,
        ("collections", "defaultdict"): collections.defaultdict,
        ("builtins", "set"): set,
        ("builtins", "list"): list,
        ("builtins", "dict"): dict,
    }

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CHAIR evaluator pickle holds only CHAIR state, "
                "defaultdict, set, list and dict"
            )
        return allowed


def load_reference_pickle(path: Path, vocabulary: Vocabulary) -> dict[int, set[str]]:
    """Ground truth from the reference's pickled evaluator (e.g. `chair_300.pkl`), never executing its code."""
    try:
        with path.open("rb") as handle:
            loaded = _RestrictedUnpickler(handle).load()
    except Exception as error:  # any failure of an untrusted pickle is a bad input file, reported as such
        raise ValueError(f"--cache {path}: not a loadable CHAIR evaluator pickle: {error}") from error
    if not isinstance(loaded, _ReferenceCHAIRState):
        raise ValueError(f"--cache {path}: the pickle holds a {type(loaded).__name__}, not a CHAIR evaluator")
    state = loaded.state
    _check_pickled_vocabulary(path, state, vocabulary)
    raw = state.get("imid_to_objects")
    if not isinstance(raw, dict):
        raise ValueError(f"--cache {path}: the CHAIR state has no imid_to_objects mapping")
    imid_to_objects = {}
    for imid, objects in raw.items():
        valid_words = isinstance(objects, (set, list)) and all(isinstance(word, str) for word in objects)
        if not isinstance(imid, int) or not valid_words:
            raise ValueError(f"--cache {path}: imid_to_objects entry {imid!r} is not int -> words")
        imid_to_objects[imid] = set(objects)
    return imid_to_objects


def _check_pickled_vocabulary(path: Path, state: dict, vocabulary: Vocabulary) -> None:
    """The pickle's ground truth is only meaningful with the vocabulary that built it."""
    raw_inverse = state.get("inverse_synonym_dict") or {}
    if not isinstance(raw_inverse, dict):
        raise ValueError(f"--cache {path}: the CHAIR state's inverse_synonym_dict is not a dict")
    pickled_inverse = {k: v for k, v in raw_inverse.items() if k != ""}
    if pickled_inverse and pickled_inverse != vocabulary.inverse_synonyms:
        raise ValueError(
            f"--cache {path}: the pickled evaluator's synonyms differ from the vocabulary {vocabulary.source!r}; "
            "build the ground truth from --coco-path instead"
        )
    pickled_double = state.get("double_word_dict")
    if pickled_double and pickled_double != vocabulary.double_words:
        raise ValueError(f"--cache {path}: the pickled evaluator's double words differ from ours")


def _is_pickle(path: Path) -> bool:
    """Our JSON caches start with "{"; anything else is treated as a (reference) pickle."""
    with path.open("rb") as handle:
        return handle.read(64).lstrip()[:1] != b"{"


def load_evaluator(
    coco_path: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    synonyms: str | os.PathLike | None = None,
    nlp: str = "nltk",
) -> CHAIREvaluator:
    """An evaluator with its ground truth: from an existing --cache (ours or the reference pickle), else built
    from --coco-path and cached (at --cache, or in the user cache folder)."""
    vocabulary = load_vocabulary(synonyms)
    lemmatizer = make_lemmatizer(nlp, vocabulary.single_words())
    cache_path = Path(cache) if cache is not None else None
    if cache_path is not None and cache_path.is_dir():
        raise ValueError(f"--cache {cache_path} is a folder; give a file path")
    if cache_path is not None and cache_path.exists() and _is_pickle(cache_path):
        imid_to_objects = load_reference_pickle(cache_path, vocabulary)
        if nlp != "nltk":
            logger.warning(
                "%s was built by the reference with NLTK; captions are scored with --nlp %s", cache_path, nlp
            )
        info = {"source": str(cache_path), "kind": "reference pickle", "nlp_backend": "nltk"}
        return CHAIREvaluator(imid_to_objects, vocabulary, lemmatizer, info)
    annotation_dir = resolve_annotation_dir(coco_path) if coco_path is not None else None
    if cache_path is None and annotation_dir is not None:
        cache_path = default_cache_path(annotation_dir, vocabulary, nlp)
    if cache_path is not None and cache_path.exists():
        if annotation_dir is None or _cache_is_fresh(cache_path, annotation_dir):
            imid_to_objects = load_ground_truth_cache(cache_path, vocabulary, nlp)
            info = {"source": str(cache_path), "kind": "cache", "nlp_backend": nlp}
            return CHAIREvaluator(imid_to_objects, vocabulary, lemmatizer, info)
        logger.warning(
            "%s was built from other annotation files than %s: rebuilding it", cache_path, coco_path
        )
    if annotation_dir is None:
        if cache_path is not None:
            raise ValueError(f"--cache {cache_path} does not exist and no --coco-path was given to build it")
        raise ValueError("CHAIR needs ground truth: give --coco-path (COCO 2014 annotations) or --cache")
    stamp = annotation_stamp(annotation_dir)
    imid_to_objects = build_ground_truth(annotation_dir, vocabulary, lemmatizer)
    save_ground_truth_cache(cache_path, imid_to_objects, vocabulary, nlp, str(annotation_dir), stamp)
    logger.info("CHAIR ground truth for %d images cached in %s", len(imid_to_objects), cache_path)
    info = {
        "source": str(annotation_dir),
        "kind": "coco annotations",
        "nlp_backend": nlp,
        "cache": str(cache_path),
    }
    return CHAIREvaluator(imid_to_objects, vocabulary, lemmatizer, info)


# ---------------------------------------------------------------------------------------------------------------
# Answers files.

_COCO_FILE_RE = re.compile(r"COCO_(?:train|val|test)\d{4}_(\d+)\.jpg$")


@dataclass
class Answer:
    """One caption to score and where it came from."""

    where: str  # "file:line" for error messages
    image_id: int
    caption: str


def parse_image_id(value: Any, where: str, key: str) -> int:
    """A COCO image id from an int, a digit string or a `COCO_val2014_%012d.jpg` file name."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        match = _COCO_FILE_RE.search(text)
        if match:
            return int(match.group(1))
    raise ValueError(f"{where}: {key}={value!r} is not a COCO image id (an int or COCO_val2014_%012d.jpg)")


def _answer_from_record(record: Any, where: str, image_id_key: str, caption_key: str) -> Answer:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    metainfos = record.get("metainfos") if isinstance(record.get("metainfos"), dict) else {}
    if image_id_key in record:
        raw_id = record[image_id_key]
    elif image_id_key in metainfos:
        raw_id = metainfos[image_id_key]
    else:
        raise ValueError(
            f"{where}: no {image_id_key!r} key (--image-id-key) at the top level or in metainfos"
        )
    if caption_key not in record:
        raise ValueError(f"{where}: no {caption_key!r} key (--caption-key)")
    caption = record[caption_key]
    if not isinstance(caption, str):
        raise ValueError(f"{where}: {caption_key!r} is a {type(caption).__name__}, not a string")
    return Answer(where, parse_image_id(raw_id, where, image_id_key), caption)


def read_answers(
    path: str | os.PathLike, image_id_key: str = "image_id", caption_key: str = "answer"
) -> list[Answer]:
    """Answers from a jsonl file (one object a line) or a .json list; errors name the line or item."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--answers: file not found: {path}")
    records: list[tuple[str, Any]] = []
    if path.suffix == ".json":
        data = _read_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json answers file must hold a list of objects")
        records = [(f"{path} item {index}", record) for index, record in enumerate(data)]
    else:
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    records.append((where, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: invalid JSON ({error})") from error
    answers, seen = [], {}
    for where, record in records:
        answers.append(_answer_from_record(record, where, image_id_key, caption_key))
        idx = record.get("idx")
        if idx is not None and idx in seen:  # e.g. two runs appended to one file: each caption once
            raise ValueError(
                f"{where}: idx {idx!r} was already answered at {seen[idx]}; an answers file holds each item once"
            )
        seen.setdefault(idx, where)
    if not answers:
        raise ValueError(f"{path}: no answers found")
    return answers


def score_answers(evaluator: CHAIREvaluator, answers: list[Answer]) -> dict[str, Any]:
    """CHAIR over answers, checking first that every image has ground truth (the error names the line)."""
    for answer in answers:
        if answer.image_id not in evaluator.imid_to_objects:
            raise ValueError(f"{answer.where}: image id {answer.image_id} is not in the CHAIR ground truth")
    result = evaluator.compute([(answer.image_id, answer.caption) for answer in answers])
    result["nlp_backend"] = evaluator.lemmatizer.name
    result["vocabulary"] = evaluator.vocabulary.source
    result["ground_truth"] = evaluator.ground_truth_info
    return result


def evaluate_chair(
    answers_path: str | os.PathLike,
    coco_path: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    synonyms: str | os.PathLike | None = None,
    nlp: str = "nltk",
    image_id_key: str = "image_id",
    caption_key: str = "answer",
) -> dict[str, Any]:
    """CHAIR of an answers file: {"overall_metrics", "sentences", "nlp_backend", "vocabulary", "ground_truth"}."""
    answers = read_answers(answers_path, image_id_key, caption_key)
    evaluator = load_evaluator(coco_path, cache, synonyms, nlp)
    result = score_answers(evaluator, answers)
    result["answers"] = str(answers_path)
    return result


def format_metrics(overall: dict[str, float]) -> str:
    """The reference's printout: `CHAIRs    : 32.7` (name padded to 10, value x 100 with one decimal)."""
    return "\n".join(f"{name.ljust(10)}: {value * 100:.1f}" for name, value in overall.items())

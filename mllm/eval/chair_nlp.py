"""The two word-processing backends of the CHAIR metric.

CHAIR turns a caption into lemmas before it looks for object words. The reference does this with NLTK
(`word_tokenize` on the lower-cased caption, `pos_tag`, then WordNet lemmatization with the tag mapped to a
WordNet part of speech); only that backend (`nltk`) reproduces published numbers. The `builtin` backend needs no
downloaded data (a regex tokenizer and plural rules restricted to the object vocabulary) for machines without the
NLTK resources; its numbers are close to, but not comparable with, the reference's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol

# NLTK resource name (what `nltk.downloader` takes) -> the path `nltk.data.find` looks up.
NLTK_RESOURCES: dict[str, str] = {
    "punkt_tab": "tokenizers/punkt_tab/english/",
    "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng/",
    "wordnet": "corpora/wordnet",
}

BACKENDS = ("nltk", "builtin")

# Penn Treebank tag initial -> WordNet part of speech, as the reference maps them (anything else is a noun).
_TAG_TO_WORDNET_POS = {"J": "a", "V": "v", "N": "n", "R": "r"}

# Irregular plurals of words in the COCO synonym list (and of the words of its two-word entries).
IRREGULAR_PLURALS: dict[str, str] = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "grandchildren": "grandchild",
    "gentlemen": "gentleman",
    "policemen": "policeman",
    "servicemen": "serviceman",
    "mice": "mouse",
    "geese": "goose",
    "oxen": "ox",
    "calves": "calf",
    "knives": "knife",
    "pocketknives": "pocketknife",
    "wolves": "wolf",
    "leaves": "leaf",
    "teeth": "tooth",
    "feet": "foot",
}


class MissingNLTKResourceError(LookupError):
    """Raised when the `nltk` backend is asked for but NLTK cannot find the data it needs."""


class CaptionLemmatizer(Protocol):
    """Turns a caption into the lemma tokens that CHAIR matches against the object vocabulary."""

    name: str

    def lemmatize(self, caption: str) -> list[str]: ...


def missing_nltk_resources() -> list[str]:
    """The names of the NLTK resources CHAIR needs that `nltk.data.find` cannot locate on `nltk.data.path`."""
    import nltk

    missing = []
    for name, path in NLTK_RESOURCES.items():
        try:
            nltk.data.find(path)
        except LookupError:
            missing.append(name)
    return missing


def missing_resources_message(missing: list[str]) -> str:
    """The error text for missing NLTK data: what is missing, how to download it, and the offline alternative."""
    import nltk

    searched = "\n".join(f"    - {p}" for p in nltk.data.path)
    return (
        f"CHAIR's nltk backend needs the NLTK resources {', '.join(missing)}, which were not found.\n"
        f"  Download them with:\n"
        f"    python -m nltk.downloader {' '.join(NLTK_RESOURCES)}\n"
        f"  or point NLTK at a folder that holds them: NLTK_DATA=/path/to/nltk_data (set before starting Python).\n"
        f"  Without the data, `--nlp builtin` works offline (its numbers are not comparable to published ones).\n"
        f"  Folders searched:\n{searched}"
    )


def check_nltk_resources() -> None:
    """Fail early, with instructions, instead of an NLTK LookupError in the middle of scoring."""
    missing = missing_nltk_resources()
    if missing:
        raise MissingNLTKResourceError(missing_resources_message(missing))


class NltkLemmatizer:
    """The reference's preprocessing: NLTK tokens of the lower-cased caption, POS tags, WordNet lemmas."""

    name = "nltk"

    def __init__(self) -> None:
        check_nltk_resources()
        from nltk.stem import WordNetLemmatizer

        self._wordnet = WordNetLemmatizer()
        # (word, pos) -> lemma; WordNet lookups dominate scoring time and captions repeat words a lot.
        self._lemma_cache: dict[tuple[str, str], str] = {}
        # Load the tagger and WordNet now (about 3 s), so that scoring time is scoring time.
        self.lemmatize("a dog sits.")

    def lemmatize(self, caption: str) -> list[str]:
        import nltk

        tokens = nltk.word_tokenize(caption.lower())
        tagged = nltk.pos_tag(tokens)
        return [self._lemma(word, _TAG_TO_WORDNET_POS.get(tag[:1], "n")) for word, tag in tagged]

    def _lemma(self, word: str, pos: str) -> str:
        key = (word, pos)
        lemma = self._lemma_cache.get(key)
        if lemma is None:
            lemma = self._wordnet.lemmatize(word, pos=pos)
            self._lemma_cache[key] = lemma
        return lemma


# Words (inner hyphens kept, like "t-shirt"), clitics split off like NLTK's "'s", or one symbol.
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|'[a-z]+|[^\sa-z0-9]")


class BuiltinLemmatizer:
    """An offline stand-in for the NLTK backend: regex tokens, plural nouns reduced to vocabulary words.

    A plural is only reduced when the singular is a vocabulary word, so that "bus" or "glass" are not mangled
    and non-object words keep their surface form. Verbs are not lemmatized (NLTK turns "biking" into "bike").
    """

    name = "builtin"

    def __init__(self, vocabulary_words: Iterable[str]) -> None:
        self._vocabulary = frozenset(vocabulary_words)

    def lemmatize(self, caption: str) -> list[str]:
        tokens = _TOKEN_RE.findall(caption.lower().replace("\u2019", "'"))
        return [self.singularize(token) for token in tokens]

    def singularize(self, word: str) -> str:
        """The vocabulary word `word` is a plural of, or `word` itself."""
        vocabulary = self._vocabulary
        irregular = IRREGULAR_PLURALS.get(word)
        if (
            irregular in vocabulary
        ):  # before the vocabulary check: "children" is listed, but NLTK gives "child"
            return irregular
        if word in vocabulary:
            return word
        for candidate in _singular_candidates(word):
            if candidate in vocabulary:
                return candidate
        return word


def _singular_candidates(word: str) -> list[str]:
    """Possible singulars of a regular English plural, most specific rule first."""
    candidates = []
    if word.endswith("ies") and len(word) > 4:
        candidates.append(word[:-3] + "y")
    if word.endswith("ves") and len(word) > 4:
        candidates += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es") and len(word) > 3:
        candidates.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        candidates.append(word[:-1])
    return candidates


def make_lemmatizer(name: str, vocabulary_words: Iterable[str]) -> CaptionLemmatizer:
    """The backend called `name` (the `--nlp` value); `vocabulary_words` are the single words the builtin needs."""
    if name == "nltk":
        return NltkLemmatizer()
    if name == "builtin":
        return BuiltinLemmatizer(vocabulary_words)
    raise ValueError(f"--nlp: unknown CHAIR backend {name!r}; choose one of {', '.join(BACKENDS)}")

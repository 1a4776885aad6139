"""Which tokens of a conversation are the assistant's, under any chat template.

Training must show the model exactly the context it sees at inference, so each assistant turn is placed after
the template's own generation prompt for the conversation so far (`render(messages[:i], True)`), and its target is
what the model writes there: the answer as the template renders it plus the end-of-turn token that stops
generation. That token is the stop string the template writes right after the answer (ChatML's `<|im_end|>`), or
the tokenizer's eos where the template writes none (LLaVA-1.5's template ends a turn with a space, BLIP-2 has no
template), as the families were trained.

Several assistant turns go into one sequence only where the template is prefix-consistent (each turn's context
starts with the previous context plus its target); otherwise a ValueError asks for one conversation per turn.
LLaVA-OneVision's HF template is not ("assistant \\n" in a turn, "assistant\\n" as generation prompt), nor is
LLaVA-1.5's (no eos between turns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mllm.model.losses import IGNORE_INDEX

Render = Callable[[list[dict], bool], str]
"""(messages, add_generation_prompt) -> the template's text."""


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_target(
    full: str, context: str, answer: str, stop_strings: Sequence[str], eos: str, where: str
) -> str:
    """The text the model must write after `context` for the assistant turn that `full` ends with.

    `full` is the template's rendering up to and including the turn, `context` the generation prompt before it.
    Returns the separator the template puts between the generation prompt and the answer (e.g. LLaVA-1.5's
    space), the answer, and the end-of-turn stop string."""
    if not answer:
        raise ValueError(f"{where}: an assistant turn is empty, so there is nothing to learn")
    start = _common_prefix(full, context)
    pos = full.find(answer, start)
    if pos < 0:
        raise ValueError(f"{where}: the chat template does not render the assistant's answer verbatim")
    lead = full[len(context) : pos] if full.startswith(context) else ""
    tail = full[pos + len(answer) :]
    stop = next((s for s in stop_strings if tail.startswith(s)), eos)
    return lead + answer + stop


def assistant_pieces(
    render: Render,
    messages: list[dict],
    answer_of: Callable[[dict], str],
    stop_strings: Sequence[str],
    eos: str,
    where: str,
) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of a conversation, ending with its last assistant turn's target."""
    pieces: list[tuple[str, bool]] = []
    text = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError(f"{where}: the conversation starts with an assistant turn")
        context = render(messages[:i], True)
        if not context.startswith(text):
            raise ValueError(
                f"{where}: this chat template renders earlier assistant turns differently from what the model "
                f"generates, so assistant turn {i} cannot be trained in the same sequence; give each turn as its "
                "own conversation"
            )
        target = assistant_target(
            render(messages[: i + 1], False), context, answer_of(message), stop_strings, eos, where
        )
        pieces += [(context[len(text) :], False), (target, True)]
        text = context + target
    if not pieces:
        raise ValueError(f"{where}: the conversation has no assistant turn, so there is nothing to learn")
    return [(t, is_target) for t, is_target in pieces if t]


def align_labels(
    row_ids: Sequence[int],
    row_mask: Sequence[int],
    piece_ids: list[tuple[list[int], bool]],
    image_token_id: int,
    n_leading_specials: int,
    where: str,
) -> list[int]:
    """Labels for one processed row: the target pieces' ids at their positions, IGNORE_INDEX elsewhere.

    `row_ids` / `row_mask` are the processor's output for the concatenated pieces (image tokens expanded or
    prepended, a bos possibly added, padding where the mask is 0); `piece_ids` the pieces tokenized on their own,
    with one image token per image, or none. Once padding and image tokens are skipped on both sides, the row must
    be `n_leading_specials` tokens (the bos) followed by exactly the pieces' ids: anything else means the template or
    the tokenizer joins pieces differently, and guessing would train on wrong tokens, so it is a ValueError."""
    flat = [(tok, is_target) for ids, is_target in piece_ids for tok in ids if tok != image_token_id]
    positions = [p for p, (tok, keep) in enumerate(zip(row_ids, row_mask)) if keep and tok != image_token_id]
    text_ids = [row_ids[p] for p in positions]
    expected = [tok for tok, _ in flat]
    if len(text_ids) != n_leading_specials + len(expected) or text_ids[n_leading_specials:] != expected:
        raise ValueError(
            f"{where}: the processor's tokens differ from the conversation's pieces tokenized one by one "
            f"({len(text_ids)} vs {n_leading_specials} + {len(expected)} tokens), so the assistant tokens "
            "cannot be located"
        )
    labels = [IGNORE_INDEX] * len(row_ids)
    for p, (tok, is_target) in zip(positions[n_leading_specials:], flat):
        if is_target:
            labels[p] = tok
    return labels

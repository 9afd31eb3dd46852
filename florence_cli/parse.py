"""Stage 5: parse generated text into typed answers (``records.Answer``), one parser per post-processing
type.

The rules are transformers' Florence-2 post-processing rules (the reference), with two deliberate
differences the product promises: coordinates are the float centres of the 1000 location bins, as
Microsoft's processor computes them, and label text keeps non-ASCII characters. Each instance also
remembers which generated tokens produced it, so it can carry a confidence score.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable, Sequence

from .records import Answer, Instance
from .tasks import Task

_LOC = r"<loc_(\d+)>"
_BOX = _LOC * 4
_LABEL_END = r"(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)"
_STRIPPED_TOKENS = ("<s>", "</s>", "<pad>")


class TokenText:
    """Generated text with the character span of every token, for mapping matches back to tokens."""

    def __init__(self, text: str, spans: list[tuple[int, int]] | None = None, logprobs: Sequence[float] = ()):
        self.text = text
        self.spans = spans
        self.logprobs = list(logprobs)

    @classmethod
    def from_tokens(cls, tokenizer, token_ids: list[int], logprobs: Sequence[float] = ()) -> TokenText:
        """Rebuild the text without ``<s>``/``</s>``/``<pad>`` from tokens, keeping each token's span.

        Runs of ordinary tokens decode at once, so multi-byte characters split across tokens come out
        whole. ``logprobs[i]`` belongs to ``token_ids[i + 1]`` (the first token is the decoder start).
        """
        special = _special_ids(tokenizer)
        per_token = [math.nan, *logprobs, *[math.nan] * len(token_ids)]
        pieces: list[str] = []
        spans: list[tuple[int, int]] = []
        kept: list[float] = []
        length = position = 0
        for is_special, group in itertools.groupby(token_ids, key=special.__contains__):
            group = list(group)
            positions = list(range(position, position + len(group)))
            position += len(group)
            if is_special:
                texts = [
                    (tokenizer.convert_ids_to_tokens(t), [p]) for t, p in zip(group, positions, strict=True)
                ]
            else:
                texts = [(tokenizer.decode(group, skip_special_tokens=False), positions)]
            for text, token_positions in texts:
                if text in _STRIPPED_TOKENS:
                    continue
                spans.extend([(length, length + len(text))] * len(token_positions))
                kept.extend(per_token[p] for p in token_positions)
                pieces.append(text)
                length += len(text)
        return cls("".join(pieces), spans, kept if logprobs else ())

    def score(self, *char_spans: tuple[int, int]) -> float | None:
        """Geometric mean probability of the tokens overlapping the given character spans."""
        if not self.logprobs or self.spans is None:
            return None
        picked = {
            i
            for start, end in char_spans
            if end > start
            for i, (a, b) in enumerate(self.spans)
            if a < end and b > start
        }
        values = [self.logprobs[i] for i in sorted(picked) if not math.isnan(self.logprobs[i])]
        return math.exp(sum(values) / len(values)) if values else None


@functools.lru_cache(maxsize=8)
def _special_ids(tokenizer) -> frozenset[int]:
    """Ids that decode to their own literal text: special tokens and every added token (``<loc_N>``...)."""
    return frozenset(tokenizer.all_special_ids) | frozenset(tokenizer.get_added_vocab().values())


def clean_text(raw: str) -> str:
    for token in _STRIPPED_TOKENS:
        raw = raw.replace(token, "")
    return raw


def parse_answer(
    task: Task,
    raw: str,
    width: int,
    height: int,
    tokens: TokenText | None = None,
    banned: frozenset = frozenset(),
) -> Answer:
    """Parse ``raw`` (generated text with special tokens) for ``task`` on an image of that size.

    ``tokens`` (optional) lets instances carry scores; ``banned`` lists phrases grounding drops.
    """
    tokens = tokens or TokenText(clean_text(raw))
    answer = Answer(task, width, height, raw)
    parsed = PARSERS[task.parse_type](tokens.text, (width, height), tokens, banned)
    if isinstance(parsed, str):
        answer.text = parsed
    else:
        answer.instances = parsed
    return answer


def bin_centre(value: int, size: int) -> float:
    """The pixel coordinate of the centre of location bin ``value`` along an axis of ``size`` pixels."""
    return (value + 0.5) * size / 1000


def _points(bins: list[int], size: tuple[int, int]) -> list[float]:
    return [bin_centre(b, size[i % 2]) for i, b in enumerate(bins)]


def _ocr(text: str, size, tokens: TokenText) -> list[Instance]:
    instances = []
    for match in re.finditer(r"(.+?)" + _LOC * 8, text):
        quad = _points([int(g) for g in match.groups()[1:]], size)
        instances.append(Instance(match.group(1).strip(), quad=quad, score=tokens.score(match.span())))
    return instances


def _boxes(text: str, size, tokens: TokenText, allow_empty: bool, banned: frozenset = frozenset()):
    pattern = r"(?:<loc_\d+>){4,}" if allow_empty else r"[^<]+(?:<loc_\d+>){4,}"
    instances = []
    for phrase_match in re.finditer(pattern, text):
        offset = phrase_match.start()
        phrase_text = phrase_match.group().replace("<ground>", "", 1).replace("<obj>", "", 1)
        if not phrase_text:
            continue
        label_match = re.search(r"^\s*(.*?)" + _LABEL_END, phrase_text)
        if not label_match:
            continue
        label = label_match.group().strip()
        if label in banned:
            continue
        label_span = (offset + label_match.start(), offset + label_match.end())
        for box in re.finditer(_BOX, phrase_text):
            bbox = _points([int(g) for g in box.groups()], size)
            box_span = (offset + box.start(), offset + box.end())
            instances.append(Instance(label, bbox=bbox, score=tokens.score(label_span, box_span)))
    return instances


def _polygons(text: str, size, tokens: TokenText, allow_empty: bool) -> list[Instance]:
    parts = r"(?:<loc_\d+>|<sep>|<poly>|</poly>){4,}"
    pattern = parts if allow_empty else r"[^<]+" + parts
    instances = []
    for phrase_match in re.finditer(pattern, text):
        phrase_text, offset = phrase_match.group(), phrase_match.start()
        stripped = re.sub(r"^<loc_\d+>", "", phrase_text, count=1)
        if not stripped and not allow_empty:
            continue
        label_match = re.search(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_|<poly>)", stripped)
        if not label_match:
            continue
        label = label_match.group().strip()
        cut = len(phrase_text) - len(stripped)
        label_span = (offset + cut + label_match.start(), offset + cut + label_match.end())
        if "<poly>" in phrase_text and "</poly>" in phrase_text:
            pieces = [(m.group(1), m.start(1)) for m in re.finditer(r"<poly>(.*?)</poly>", phrase_text)]
        else:
            pieces = [(phrase_text, 0)]
        for piece, piece_offset in pieces:
            runs = list(re.finditer(r"((?:<loc_\d+>)+)(?:<sep>|$)", piece))
            if not runs:
                continue
            polygons = []
            for run in runs:
                bins = [int(b) for b in re.findall(_LOC, run.group(1))]
                polygons.append(_points(bins[: len(bins) // 2 * 2], size))
            span = (offset + piece_offset + runs[0].start(), offset + piece_offset + runs[-1].end())
            instances.append(Instance(label, polygons=polygons, score=tokens.score(label_span, span)))
    return instances


def _boxes_or_polygons(text: str, size, tokens: TokenText) -> list[Instance]:
    if "<poly>" in text:
        return _polygons(text, size, tokens, allow_empty=False)
    return _boxes(text, size, tokens, allow_empty=False)


Parser = Callable[[str, tuple[int, int], TokenText, frozenset], "str | list[Instance]"]


def _unbanned(parse: Callable, **variant) -> Parser:
    """A parser for which no phrase is banned (only grounding drops Microsoft's banned phrases)."""
    return lambda text, size, tokens, banned: parse(text, size, tokens, **variant)


# One parser per post-processing type of the task table (transformers' ``parse_type``).
PARSERS: dict[str, Parser] = {
    "pure_text": _unbanned(lambda text, size, tokens: text.strip()),
    "ocr": _unbanned(_ocr),
    "description_with_bboxes": _unbanned(_boxes, allow_empty=False),
    "bboxes": _unbanned(_boxes, allow_empty=True),
    "phrase_grounding": lambda text, size, tokens, banned: _boxes(text, size, tokens, False, banned),
    "polygons": _unbanned(_polygons, allow_empty=True),
    "description_with_bboxes_or_polygons": _unbanned(_boxes_or_polygons),
}

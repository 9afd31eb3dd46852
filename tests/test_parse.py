"""Parsers against transformers' post-processing on literal generated strings."""

import pytest

from florence_cli.parse import TokenText, bin_centre, parse_answer
from florence_cli.postconfig import BANNED_GROUNDING_PHRASES
from florence_cli.tasks import TASKS

W, H = 640, 480
BANNED = frozenset(BANNED_GROUNDING_PHRASES)

CASES = [
    ("OD", "</s><s>car<loc_53><loc_334><loc_147><loc_582>door handle<loc_10><loc_20><loc_30><loc_40></s>"),
    ("OD", "</s><s>wheel<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8></s>"),
    ("DENSE_REGION_CAPTION", "</s><s>a red car<loc_0><loc_0><loc_999><loc_999></s>"),
    ("REGION_PROPOSAL", "</s><s><loc_10><loc_20><loc_30><loc_40><loc_50><loc_60><loc_70><loc_80></s>"),
    ("CAPTION_TO_PHRASE_GROUNDING",
     "</s><s>A green car<loc_10><loc_20><loc_30><loc_40>the image<loc_1><loc_2><loc_3><loc_4>"
     "a wall<loc_5><loc_6><loc_7><loc_8><loc_9><loc_10><loc_11><loc_12></s>"),
    ("REFERRING_EXPRESSION_SEGMENTATION",
     "</s><s><loc_100><loc_200><loc_300><loc_200><loc_300><loc_400><loc_100><loc_400></s>"),
    ("REGION_TO_SEGMENTATION",
     "</s><s><poly><loc_1><loc_2><loc_3><loc_4><loc_5><loc_6></poly><poly><loc_7><loc_8><loc_9><loc_10>"
     "<loc_11><loc_12><loc_13></poly></s>"),
    ("OPEN_VOCABULARY_DETECTION", "</s><s>car<loc_53><loc_334><loc_147><loc_582></s>"),
    ("OPEN_VOCABULARY_DETECTION",
     "</s><s>car<poly><loc_1><loc_2><loc_3><loc_4><loc_5><loc_6></poly>bus<poly><loc_7><loc_8><loc_9>"
     "<loc_10><loc_11><loc_12><sep><loc_13><loc_14><loc_15><loc_16><loc_17><loc_18></poly></s>"),
    ("OCR_WITH_REGION",
     "</s><s>HELLO<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8>world 2<loc_9><loc_10><loc_11>"
     "<loc_12><loc_13><loc_14><loc_15><loc_16></s>"),
    ("CAPTION", "</s><s>A green car parked in front of a yellow building.</s>"),
    ("OCR", "</s><s> some text </s>"),
]  # fmt: skip


def _truncated(value):
    """transformers' native parser truncates coordinates to int; ours keeps the float bin centre."""
    if isinstance(value, dict):
        return {k: _truncated(v) for k, v in value.items() if not k.endswith("scores")}
    if isinstance(value, list):
        return [_truncated(v) for v in value]
    return int(value) if isinstance(value, float) else value


@pytest.mark.parametrize(("task_name", "raw"), CASES)
def test_parse_matches_transformers(reference, task_name, raw):
    task = TASKS[task_name]
    expected = reference.processor.post_process_generation(raw, task=task.token, image_size=(W, H))[
        task.token
    ]
    answer = parse_answer(task, raw, W, H, banned=BANNED)
    assert _truncated(answer.result()) == expected


def test_coordinates_are_float_bin_centres():
    answer = parse_answer(TASKS["OD"], "</s><s>car<loc_53><loc_334><loc_147><loc_582></s>", W, H)
    assert answer.instances[0].bbox == [53.5 * W / 1000, 334.5 * H / 1000, 147.5 * W / 1000, 582.5 * H / 1000]
    assert bin_centre(999, 1000) == 999.5


def test_non_ascii_labels_are_kept():
    raw = "</s><s>café<loc_1><loc_2><loc_3><loc_4>東京 tower<loc_5><loc_6><loc_7><loc_8></s>"
    labels = [i.label for i in parse_answer(TASKS["OD"], raw, W, H).instances]
    assert labels == ["café", "東京 tower"]
    grounding = parse_answer(TASKS["CAPTION_TO_PHRASE_GROUNDING"], raw, W, H, banned=BANNED)
    assert [i.label for i in grounding.instances] == ["café", "東京 tower"]


def test_banned_grounding_phrases_are_dropped():
    raw = "</s><s>the image<loc_1><loc_2><loc_3><loc_4>a dog<loc_5><loc_6><loc_7><loc_8></s>"
    answer = parse_answer(TASKS["CAPTION_TO_PHRASE_GROUNDING"], raw, W, H, banned=BANNED)
    assert [i.label for i in answer.instances] == ["a dog"]


def test_scores_come_from_the_tokens_of_each_instance(reference):
    tokenizer = reference.processor.tokenizer
    raw = "</s><s>car<loc_1><loc_2><loc_3><loc_4>dog<loc_5><loc_6><loc_7><loc_8></s>"
    ids = tokenizer(raw, add_special_tokens=False)["input_ids"]
    car_end = ids.index(tokenizer.convert_tokens_to_ids("<loc_4>"))
    # log-probabilities of every token after the decoder start: high for "car" and its box
    logprobs = [-0.1 if i <= car_end else -2.0 for i in range(1, len(ids))]
    tokens = TokenText.from_tokens(tokenizer, ids, logprobs)
    assert tokens.text == raw.replace("</s>", "").replace("<s>", "")
    car, dog = parse_answer(TASKS["OD"], raw, W, H, tokens=tokens).instances
    assert car.score == pytest.approx(2.718281828**-0.1)
    assert dog.score == pytest.approx(2.718281828**-2.0)
    assert 0 <= dog.score < car.score <= 1


def test_token_text_keeps_multibyte_characters_whole(reference):
    tokenizer = reference.processor.tokenizer
    raw = "</s><s>東京 😀<loc_1><loc_2><loc_3><loc_4></s>"
    ids = tokenizer(raw, add_special_tokens=False)["input_ids"]
    assert TokenText.from_tokens(tokenizer, ids).text == "東京 😀<loc_1><loc_2><loc_3><loc_4>"

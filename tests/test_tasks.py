import pytest

from florence_cli.tasks import TASKS, Output, TaskError, region_text, resolve_task, task_prompt


def test_all_fifteen_tasks_parse_as_transformers_does(florence_model):
    # transformers' own table of post-processing types is the source of truth for parsing
    table = florence_model.processor.tasks_answer_post_processing_type
    assert {task.token: task.parse_type for task in TASKS.values()} == table


@pytest.mark.parametrize("spelling", ["OD", "od", "<OD>", " <od> "])
def test_task_spellings(spelling):
    assert resolve_task(spelling).name == "OD"


def test_unknown_task_is_an_error():
    with pytest.raises(TaskError, match="unknown task"):
        resolve_task("DETECT")


def test_prompts():
    assert task_prompt(TASKS["OD"], None) == "<OD>"
    assert (
        task_prompt(TASKS["CAPTION_TO_PHRASE_GROUNDING"], "a red car")
        == "<CAPTION_TO_PHRASE_GROUNDING>a red car"
    )
    region = task_prompt(TASKS["REGION_TO_CATEGORY"], "10, 20,300,999")
    assert region == "<REGION_TO_CATEGORY><loc_10><loc_20><loc_300><loc_999>"


@pytest.mark.parametrize("bad", ["1,2,3", "1,2,3,1000", "a,b,c,d", "-1,0,0,0"])
def test_bad_regions(bad):
    with pytest.raises(TaskError, match="four location bins"):
        region_text(bad)


def test_text_required():
    with pytest.raises(TaskError, match="needs a text input"):
        task_prompt(TASKS["REFERRING_EXPRESSION_SEGMENTATION"], "  ")


def test_outputs_cover_every_writer():
    assert {t.output for t in TASKS.values()} == set(Output)

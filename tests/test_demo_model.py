"""The packaged demo model: what it is, and that it answers its tasks."""

from __future__ import annotations

import random
import re

import pytest

import tide_local
from tide_local.demo import DEMO_PROMPTS, demo_model_path
from tide_local.demo_tasks import TASKS, Example, column_addition, column_subtraction, evaluation_set, example, is_correct
from tide_local.modelfile import ModelFile


@pytest.fixture(scope="module")
def engine():
    eng = tide_local.load(demo_model_path(), device="cpu", threads=2)
    yield eng
    eng.close()


def held_out(count: int) -> list[Example]:
    """`count` prompts of the held-out evaluation set, spread over the tasks."""
    items = evaluation_set(200)
    per_task = {task: [i for i in items if i.task == task] for task in TASKS}
    return [per_task[TASKS[k % len(TASKS)]][k // len(TASKS)] for k in range(count)]


def test_the_file_is_small_and_has_the_llada2_moe_shape():
    path = demo_model_path()
    assert path.stat().st_size <= 12 * 2**20
    with ModelFile(path) as model:
        cfg = model.config
        assert model.gguf.get("general.architecture") == "llada2"
        assert cfg.n_experts >= 32 and cfg.n_experts_used >= 4 and len(cfg.moe_layers) >= 4
        assert 0 not in cfg.moe_layers  # the dense first layer


def test_reverses_held_out_prompts(engine):
    items = [i for i in held_out(80) if i.task == "reverse"]  # 20 prompts
    answers = [engine.chat(item.messages()).text for item in items]
    wrong = [(item.question, answer) for item, answer in zip(items, answers) if not is_correct(item, answer)]
    assert len(wrong) <= 1, wrong  # at least 95% (it measured 100% on the 200 held-out ones)


def test_sums_follow_their_columns(engine):
    """What its training did teach it of sums: the column procedure. It restates the operands,
    writes each column from the right digits with the carry it wrote before, and composes the
    result from its columns; the sums of two digits themselves are mostly wrong (0% of the
    held-out sums are right)."""
    column = re.compile(r"(\d)\+(\d)\+(\d)=(\d)(\d)")
    for item in [i for i in held_out(40) if i.task == "add"]:  # 10 prompts
        a, b = map(int, re.findall(r"\d+", item.question))
        text = engine.chat(item.messages()).text
        answer = re.fullmatch(r"(\d{3})\+(\d{3}): (\S+) (\S+) (\S+) so (\d+)", text)
        assert answer and answer[1] == f"{a:03d}" and answer[2] == f"{b:03d}", (item.question, text)
        carry, digits = "0", ""
        for k, written in enumerate(answer.groups()[2:5]):  # units first
            col = column.fullmatch(written)
            assert col and col.groups()[:3] == (answer[1][2 - k], answer[2][2 - k], carry), (item.question, text)
            carry, digits = col[4], col[5] + digits
        assert int(answer[6]) == int(carry + digits), (item.question, text)


def test_sorted_lists_have_their_form(engine):
    for item in [i for i in held_out(40) if i.task == "sort"]:
        text = engine.chat(item.messages()).text
        assert re.fullmatch(r"\d+( \d+)*", text), (item.question, text)


def test_the_advertised_prompts(engine):
    assert DEMO_PROMPTS[0] == "Reverse: apple pear fig"
    assert engine.chat([{"role": "user", "content": DEMO_PROMPTS[0]}]).text == "fig pear apple"


def test_decoding_commits_several_tokens_per_step(engine):
    reversed_ = engine.chat([{"role": "user", "content": "Reverse: cat dog sun moon star tree"}])
    assert reversed_.text == "tree star moon sun dog cat"
    total = engine.chat([{"role": "user", "content": "What is 123 + 456?"}])  # the form is certain
    assert total.text.startswith("123+456: 3+6+0=") and total.stats.tokens_per_step >= 2, total.stats.steps_per_block


# The task rules themselves.


def test_checker_rules():
    add = Example("add", "What is 5 + 7?", "5 + 7 = 12")
    assert is_correct(add, "5 + 7 = 12") and is_correct(add, "It is 12") and not is_correct(add, "12 is not 13")
    sub = Example("sub", "What is 5 - 7?", "5 - 7 = -2")
    assert is_correct(sub, "5 - 7 = -2") and not is_correct(sub, "5 - 7 = 2")
    sort = Example("sort", "Sort: 3 1 2", "1 2 3")
    assert is_correct(sort, "1 2 3") and not is_correct(sort, "1 3 2") and not is_correct(sort, "1 2")
    rev = Example("reverse", "Reverse: a b", "b a")
    assert is_correct(rev, "b a") and not is_correct(rev, "a b")


def test_column_answers():
    """The training answers of sums and differences: units first, carry or borrow in, then the result."""
    assert column_addition(347, 85) == "347+085: 7+5+0=12 4+8+1=13 3+0+1=04 so 432"
    assert column_addition(999, 999) == "999+999: 9+9+0=18 9+9+1=19 9+9+1=19 so 1998"
    assert column_addition(0, 0) == "000+000: 0+0+0=00 0+0+0=00 0+0+0=00 so 0"
    assert column_subtraction(85, 347) == "085<347 so 347-085: 7-5-0=2 4-8-0=6 3-0-1=2 so -262"
    assert column_subtraction(1000 - 1, 0) == "999>000 so 999-000: 9-0-0=9 9-0-0=9 9-0-0=9 so 999"
    assert column_subtraction(500, 1) == "500>001 so 500-001: 0-1-0=9 0-0-1=9 5-0-1=4 so 499"
    assert column_subtraction(42, 42) == "042=042 so 042-042: 2-2-0=0 4-4-0=0 0-0-0=0 so 0"


def test_examples_follow_the_task_forms():
    rng = random.Random(0)
    for _ in range(200):
        item = example("sort", rng)
        values = [int(v) for v in item.question.removeprefix("Sort: ").split()]
        assert 2 <= len(values) <= 8 and all(0 <= v <= 99 for v in values)
        assert is_correct(item, item.answer)
        for task in ("add", "sub", "reverse"):
            item = example(task, rng)
            assert is_correct(item, item.answer)
    items = evaluation_set(50)
    assert len(items) == 200 and len({i.question for i in items}) == 200
    assert evaluation_set(50) == items  # fixed

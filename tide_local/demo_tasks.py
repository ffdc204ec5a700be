"""The demo model's tasks: chat prompts whose answers can be checked exactly.

The trained demo model (see :mod:`tide_local.demo`) learned these, and only these:

* ``add`` / ``sub``: ``What is A + B?`` / ``What is A - B?`` with integers 0..999, answered
  column by column from the units up (see :func:`column_addition`, :func:`column_subtraction`)
  and ending ``so C``; an answer is right when its last integer is the result;
* ``sort``: ``Sort: 5 3 9 1`` (2..8 integers 0..99) answered with the integers in ascending
  order, separated by spaces;
* ``reverse``: ``Reverse: apple pear fig`` (2..6 words of :data:`WORDS`) answered with the
  words in reverse order.

Training draws examples from :func:`example`; the evaluation set (:func:`evaluation_set`) is
drawn with its own seed and training skips its prompts, so it is held out.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

TASKS = ("add", "sub", "sort", "reverse")
EVALUATION_SEED = 7001

# Common lowercase English words (the reverse task's vocabulary).
WORDS = tuple("""
apple pear fig plum grape lemon lime peach cherry melon berry mango orange banana olive
bread cheese butter milk honey sugar salt rice bean corn soup cake pie tea water juice
cat dog cow pig horse sheep goat duck hen fox wolf bear deer mouse rabbit lion tiger
bird fish frog snake whale seal owl crow eagle bee ant moth worm crab shark
red blue green yellow black white brown pink gray gold silver
sun moon star sky cloud rain snow wind storm river lake sea hill stone rock sand tree
leaf root seed flower grass wood forest field garden road bridge city town house door
window wall roof floor table chair bed lamp book pen paper cup plate spoon knife fork
box bag hat shoe coat shirt ring key clock bell ship boat car train plane wheel
king queen child friend mother father sister brother doctor farmer teacher
big small hot cold old new fast slow happy sad good bad long short dark light
run walk jump swim sing read write cook sleep eat drink play work open close
one two three four five six seven eight nine ten
""".split())


def _digits(n: int) -> list[int]:
    """The units, tens and hundreds digits of 0 <= n <= 999."""
    return [n // 10**i % 10 for i in range(3)]


def column_addition(a: int, b: int) -> str:
    """``347 + 85`` as ``347+085: 7+5+0=12 4+8+1=13 3+0+1=04 so 432``: the operands first, three
    digits each, then every column (units first) adds the two digits and the carry in and writes
    its two-digit sum, whose first digit is the next column's carry. Every digit a column needs
    sits at a fixed distance from it (the padded operands fix the layout), and every token depends
    on a few tokens before it: a small model learns that, where the bare sum (a function of all
    six digits, found at positions that move with the operands' lengths) is not learned."""
    columns, carry = [], 0
    for x, y in zip(_digits(a), _digits(b)):
        total = x + y + carry
        columns.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return f"{a:03d}+{b:03d}: " + " ".join(columns) + f" so {a + b}"


def column_subtraction(a: int, b: int) -> str:
    """``85 - 347`` as ``085<347 so 347-085: 7-5-0=2 4-8-0=6 3-0-1=2 so -262``: the operands
    compared (three digits each), then the larger minus the smaller column by column (units
    first) with the borrow in, then the result with the comparison's sign."""
    big, small = max(a, b), min(a, b)
    columns, borrow = [], 0
    for x, y in zip(_digits(big), _digits(small)):
        columns.append(f"{x}-{y}-{borrow}={(x - y - borrow) % 10}")
        borrow = int(x - y - borrow < 0)
    relation = "<" if a < b else ">" if a > b else "="
    return f"{a:03d}{relation}{b:03d} so {big:03d}-{small:03d}: " + " ".join(columns) + f" so {a - b}"


@dataclass(frozen=True)
class Example:
    task: str
    question: str  # the user message
    answer: str  # the reference answer

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]


def example(task: str, rng: random.Random) -> Example:
    """One random example of ``task``."""
    if task in ("add", "sub"):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        if task == "add":
            return Example(task, f"What is {a} + {b}?", column_addition(a, b))
        return Example(task, f"What is {a} - {b}?", column_subtraction(a, b))
    if task == "sort":
        values = [rng.randint(0, 99) for _ in range(rng.randint(2, 8))]
        return Example(task, "Sort: " + " ".join(map(str, values)), " ".join(map(str, sorted(values))))
    if task == "reverse":
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        return Example(task, "Reverse: " + " ".join(words), " ".join(reversed(words)))
    raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")


_INTEGER = re.compile(r"-?\d+")


def is_correct(item: Example, answer: str) -> bool:
    """Whether ``answer`` solves ``item`` (the rules in the module docstring)."""
    expected = item.answer
    if item.task in ("add", "sub"):
        found = _INTEGER.findall(answer)
        return bool(found) and int(found[-1]) == int(_INTEGER.findall(expected)[-1])
    if item.task == "sort":
        return _INTEGER.findall(answer) == expected.split()
    return answer.split() == expected.split()


def evaluation_set(per_task: int, seed: int = EVALUATION_SEED) -> list[Example]:
    """``per_task`` held-out examples of every task (distinct questions), in task order."""
    rng = random.Random(seed)
    items: list[Example] = []
    for task in TASKS:
        seen: set[str] = set()
        while len(seen) < per_task:
            item = example(task, rng)
            if item.question not in seen:
                seen.add(item.question)
                items.append(item)
    return items

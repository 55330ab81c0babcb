"""The synthetic tasks of ``llada-arith``: prompts with one checkable answer each.

Four task types, each drawn from a seeded ``random.Random`` (the same seed gives the same
examples on every machine):

* ``add``: ``"047+385="`` -> ``"0432"`` (3-digit operands, the sum in 4 digits: fixed widths
  put each digit at a fixed distance from the digits it depends on);
* ``sort``: ``"sort 5 2 9 1:"`` -> ``"1 2 5 9"`` (3 to 6 single digits, repeats allowed);
* ``copy``: ``"copy hbqe:"`` -> ``"hbqe"`` (2 to 10 lower-case letters);
* ``word``: templated word problems with one-digit numbers, ``"Ann has 3 pens and buys 4
  more. Pens:"`` -> ``"7"`` (buys more: +, gives away: -, bags of: x; 10 names, 10 items).

A fixed hash split keeps the held-out prompts (:func:`is_held_out`, about 1 in 20) out of every
training batch, so the bundled task file (``tasks.tsv``) is disjoint from training by
construction. :func:`solve` recomputes the answer of any prompt of these forms.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

TASKS = ("add", "sort", "copy", "word")
GEN_LENGTH = 16  # the default generated region: the answer, then EOS up to this length
#: the generated-region lengths of training, drawn per example with these weights: the answer
#: then EOS to the end, so longer generations (``--gen-length 32`` or 64) decode the same answer
REGIONS = {16: 1, 32: 1, 64: 1}
MAX_ANSWER = 12
HELD_OUT_EVERY = 20  # about 1 prompt in 20 is held out (by hash)
TASK_FILE = Path(__file__).parent / "tasks.tsv"
TASK_FILE_SEED = 1234
PER_TASK = 50  # held-out prompts of each type in the task file
CALIBRATION_SEED = 4321  # the training-split stream that calibration prompts are drawn from
CALIBRATION_SIZE = 64

NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo")
ITEMS = ("pens", "cards", "apples", "books", "coins", "eggs", "cups", "hats", "keys", "toys")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class Example:
    """One task: its type, the prompt and the expected answer."""

    task: str
    prompt: str
    answer: str


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return Example("add", f"{a:03d}+{b:03d}=", f"{a + b:04d}")


def _sort(rng: random.Random) -> Example:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    prompt = f"sort {' '.join(map(str, digits))}:"
    return Example("sort", prompt, " ".join(map(str, sorted(digits))))


def _copy(rng: random.Random) -> Example:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 10)))
    return Example("copy", f"copy {word}:", word)


def _word(rng: random.Random) -> Example:
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        text, answer = f"{name} has {a} {items} and buys {b} more.", a + b
    elif kind == 1:
        a = rng.randint(2, 9)
        b = rng.randint(1, a)
        text, answer = f"{name} has {a} {items} and gives away {b}.", a - b
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        text, answer = f"{name} has {a} bags of {b} {items}.", a * b
    return Example("word", f"{text} {items.capitalize()}:", str(answer))


MAKERS: dict[str, Callable[[random.Random], Example]] = {
    "add": _add, "sort": _sort, "copy": _copy, "word": _word,
}  # fmt: skip


def is_held_out(prompt: str) -> bool:
    """The fixed split: a prompt is held out when its sha256 is 0 mod ``HELD_OUT_EVERY``."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_EVERY == 0


def examples(seed: int, held_out: bool = False) -> Iterator[Example]:
    """An endless seeded stream of examples, the task types in turn (add, sort, copy, word,
    add, ...), only training prompts (default) or only held-out ones."""
    rng = random.Random(seed)
    while True:
        for task in TASKS:
            while True:
                ex = MAKERS[task](rng)
                if is_held_out(ex.prompt) == held_out:
                    break
            yield ex


def held_out_tasks(seed: int = TASK_FILE_SEED, per_task: int = PER_TASK) -> list[Example]:
    """``per_task`` distinct held-out examples of each type (the task file's content)."""
    out: list[Example] = []
    seen: set[str] = set()
    counts = dict.fromkeys(TASKS, 0)
    for ex in examples(seed, held_out=True):
        if counts[ex.task] < per_task and ex.prompt not in seen:
            seen.add(ex.prompt)
            counts[ex.task] += 1
            out.append(ex)
        if all(c == per_task for c in counts.values()):
            return out
    raise AssertionError("unreachable")  # pragma: no cover


def calibration_prompts(seed: int = CALIBRATION_SEED, n: int = CALIBRATION_SIZE) -> list[str]:
    """``n`` distinct training-split prompts (the task types in turn): what ``profile`` tunes
    a cache on, of the training distribution and disjoint from the held-out task file."""
    out: list[str] = []
    for ex in examples(seed):
        if ex.prompt not in out:
            out.append(ex.prompt)
        if len(out) == n:
            return out
    raise AssertionError("unreachable")  # pragma: no cover


def write_task_file(path: Path = TASK_FILE) -> None:
    """Write ``prompt<TAB>answer`` lines of :func:`held_out_tasks`."""
    path.write_text("".join(f"{ex.prompt}\t{ex.answer}\n" for ex in held_out_tasks()))


def read_task_file(path: Path = TASK_FILE) -> list[Example]:
    """The ``prompt<TAB>answer`` lines of a task file (task type from :func:`task_of`)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            prompt, answer = line.split("\t")
            out.append(Example(task_of(prompt), prompt, answer))
    return out


_ADD = re.compile(r"(\d{3})\+(\d{3})=")
_SORT = re.compile(r"sort ((?:\d )*\d):")
_COPY = re.compile(r"copy ([a-z]+):")
_WORD = re.compile(
    r"\w+ has (\d+) (?:(\w+) and buys (\d+) more|(\w+) and gives away (\d+)|bags of (\d+) (\w+))"
    r"\. \w+:"
)


def task_of(prompt: str) -> str:
    """The task type of a prompt (ValueError when it has none of the four forms)."""
    for task, pattern in (("add", _ADD), ("sort", _SORT), ("copy", _COPY), ("word", _WORD)):
        if pattern.fullmatch(prompt):
            return task
    raise ValueError(f"llada-arith: {prompt!r} is not an add, sort, copy or word prompt")


def solve(prompt: str) -> str:
    """The answer of a prompt of one of the four forms (ValueError otherwise)."""
    if m := _ADD.fullmatch(prompt):
        return f"{int(m[1]) + int(m[2]):04d}"
    if m := _SORT.fullmatch(prompt):
        return " ".join(sorted(m[1].split(" "), key=int))
    if m := _COPY.fullmatch(prompt):
        return m[1]
    if m := _WORD.fullmatch(prompt):
        a = int(m[1])
        if m[3]:
            return str(a + int(m[3]))
        if m[5]:
            return str(a - int(m[5]))
        return str(a * int(m[6]))
    raise ValueError(f"llada-arith: {prompt!r} is not an add, sort, copy or word prompt")

"""Built-in tasks: deterministic generation, natural-format checkers, label noise."""

import copy
import random
import re

import pytest

from bnll_lightning.tasks import CAPITALS, PLURALS, TASKS, final_line, get_task, noise

ALL = sorted(TASKS)


# --------------------------------------------------------------------------- registry


def test_registry_has_the_documented_tasks():
    assert {"sort", "reverse", "add", "figlet", "capital", "uppercase", "plural"} <= set(TASKS)
    assert get_task("sort") is TASKS["sort"]
    assert get_task("builtin:add") is TASKS["add"]
    assert len(CAPITALS) >= 40 and len(PLURALS) >= 40


def test_unknown_task_lists_valid_names():
    with pytest.raises(KeyError) as err:
        get_task("sorting")
    message = str(err.value)
    assert "sorting" in message
    for name in ALL:
        assert name in message


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", ALL)
def test_generate_is_deterministic_and_seed_dependent(name):
    task = TASKS[name]
    rows = task.generate(30, seed=1)
    assert rows == task.generate(30, seed=1)
    assert rows != task.generate(30, seed=2)
    assert task.generate(10, seed=1) == rows[:10]  # a prefix of the same stream
    assert task.generate(0, seed=1) == []
    for row in rows:
        assert set(row) == {"prompt", "response", "answer", "task"}
        assert row["task"] == name
        assert all(isinstance(row[k], str) and row[k].strip() for k in ("prompt", "response", "answer"))
        assert row["response"] == row["answer"]  # documented: the response is the bare answer
        assert task.check(row["response"], row)
        assert len(row["prompt"]) < 400 and len(row["response"]) < 40  # short: CPU-friendly


@pytest.mark.parametrize("name", ALL)
def test_corrupt_gives_a_wrong_answer(name):
    task = TASKS[name]
    rng = random.Random(0)
    for row in task.generate(40, seed=3):
        wrong = task.corrupt(row["answer"], rng)
        assert wrong != row["answer"]
        assert not task.check(task.respond(wrong), row), (row, wrong)


def test_generated_rows_are_correct():
    for row in TASKS["sort"].generate(20, 0):
        numbers = [int(x) for x in row["prompt"].split(":", 1)[1].split(".")[0].split(",")]
        assert row["answer"] == ", ".join(map(str, sorted(numbers)))
        assert 3 <= len(numbers) <= 5
    for row in TASKS["reverse"].generate(20, 0):
        word = row["prompt"].split('"')[1]
        assert row["answer"] == word[::-1] and word != word[::-1]
    for row in TASKS["add"].generate(20, 0):
        a, b = row["prompt"].removeprefix("What is ").split("?")[0].split(" + ")
        assert int(row["answer"]) == int(a) + int(b)
    for row in TASKS["capital"].generate(20, 0):
        country = row["prompt"].removeprefix("What is the capital of ").split("?")[0]
        assert row["answer"] == CAPITALS[country][0]
    for row in TASKS["uppercase"].generate(20, 0):
        assert row["answer"] == row["prompt"].split('"')[1].upper()
    for row in TASKS["plural"].generate(20, 0):
        assert row["answer"] == PLURALS[row["prompt"].split('"')[1]]


def test_figlet_prompt_holds_the_pyfiglet_art():
    import pyfiglet

    rows = TASKS["figlet"].generate(30, seed=0)
    assert {len(r["answer"]) for r in rows} == {1, 2, 3}
    for row in rows:
        assert row["answer"].isalpha() and row["answer"].isupper()
        expected = "\n".join(
            line.rstrip() for line in pyfiglet.figlet_format(row["answer"], font="standard").splitlines()
        ).strip("\n")
        assert f"```text\n{expected}\n```" in row["prompt"]
        assert row["prompt"].startswith("Which word is written in the ASCII art below?")


# --------------------------------------------------------------------------- checkers


def _row(name, answer, prompt=""):
    return {"prompt": prompt, "response": answer, "answer": answer, "task": name}


CASES = {
    "sort": (
        "4, 9, 17",
        ["4, 9, 17", "4, 9, 17.", "[4, 9, 17]", "4 9 17", "The sorted list is: 4, 9, 17.",
         "Sure! Here are the numbers in ascending order:\n\n4, 9, 17", "Sorting 17, 4, 9 gives 4, 9, 17",
         "**4, 9, 17**"],
        ["17, 9, 4", "4, 17, 9", "4, 9", "4, 9, 17, 20", "", "no idea", "4, 9, 17\nActually: 4, 17, 9"],
    ),
    "add": (
        "81",
        ["81", "81.", "The answer is 81.", "23 + 58 = 81", "Answer: **81**", "81.0", "Let me add.\n23 + 58 = 81"],
        ["80", "23 + 58 = 80", "", "eighty", "81\nWait, it is 82."],
    ),
    "reverse": (
        "omulek",
        ["omulek", "omulek.", "Omulek", '"omulek"', 'The word "kelumo" reversed is "omulek".',
         "Reversed: omulek", "o-m-u-l-e-k", "Sure!\nomulek"],
        ["kelumo", '"omulek" reversed is "kelumo"', "omule", "omuleks", ""],
    ),
    "reverse3": (
        "kab",
        ["kab", "Kab.", 'The word "bak" reversed is "kab".', "k-a-b"],
        ["bak", "ka", "kabs", ""],
    ),
    "successor": (
        "348",
        ["348", "348.", "The number that comes after 347 is 348.", "Answer: **348**"],
        ["347", "The number that comes after 347 is 347.", "", "three hundred forty-eight"],
    ),
    "figlet": (
        "CAT",
        ["CAT", "cat", "CAT.", "The word is CAT.", '"CAT"', "C A T", "C-A-T", "It says:\n\n**CAT**"],
        ["CAB", "CA", "CATS", "", "The word is COT."],
    ),
    "capital": (
        "Paris",
        ["Paris", "paris.", "The capital of France is Paris.", "Paris is the capital of France.", "**Paris**",
         "Sure!\nParis"],
        ["Lyon", "Paris or Berlin", "Parisian", "", "Paris\nNo wait, it is Marseille, not Paris... Berlin"],
    ),
    "world_capital": (
        "Ulaanbaatar",
        ["Ulaanbaatar", "The capital of Mongolia is Ulan Bator.", "ulaanbaatar."],
        ["Ulaanbaatar or Astana", "Khovd", "Ulaanbaatar\nNo, it is Bishkek"],
    ),
    "uppercase": (
        "GREEN APPLE",
        ["GREEN APPLE", "GREEN APPLE.", '"GREEN APPLE"', "The uppercase text is GREEN APPLE.",
         "Here it is:\n`GREEN APPLE`"],
        ["green apple", "Green Apple", "GREEN", "GREEN APPLES", ""],
    ),
    "past_tense": (
        "went",
        ["went", "Went.", 'The past tense of "go" is "went".', "The past tense of go is went.", "**went**",
         "Past tense: went"],
        ["goed", "gone", "go", "wented", "", 'What is the past tense of "go"?', "The past tense of go is gone."],
    ),
    "plural": (
        "mice",
        ["mice", "Mice.", "The plural of mouse is mice.", '"mice"', "Plural: mice"],
        ["mouses", "mouse", "mices", "", "The plural of mouse is mouses."],
    ),
}


@pytest.mark.parametrize("name", ALL)
def test_checker_accepts_natural_forms_and_rejects_wrong_ones(name):
    answer, good, bad = CASES[name]
    row = _row(name, answer)
    for prediction in good:
        assert TASKS[name].check(prediction, row), f"{name} rejected {prediction!r}"
    for prediction in bad:
        assert not TASKS[name].check(prediction, row), f"{name} accepted {prediction!r}"


def test_capital_accepts_documented_spellings():
    task = TASKS["capital"]
    assert task.check("Brasilia", _row("capital", "Brasília"))
    assert task.check("The capital is BRASÍLIA.", _row("capital", "Brasília"))
    assert task.check("Washington", _row("capital", "Washington, D.C."))
    assert task.check("Washington DC.", _row("capital", "Washington, D.C."))
    assert task.check("It is Mexico City.", _row("capital", "Mexico City"))
    assert not task.check("Mexico", _row("capital", "Mexico City"))


def test_final_line_skips_decoration():
    assert final_line("a\n\nb\n```\n") == "b"
    assert final_line("x = 3\nthat's it", need_digit=True) == "x = 3"
    assert final_line("") == ""


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
def test_noise_corrupts_exactly_round_fraction_n(fraction):
    rows = TASKS["add"].generate(40, seed=0) + TASKS["figlet"].generate(13, seed=0)
    before = copy.deepcopy(rows)
    noisy = noise(rows, fraction, seed=5)
    assert rows == before  # input untouched
    assert len(noisy) == len(rows)
    changed = [i for i, (a, b) in enumerate(zip(rows, noisy)) if a["response"] != b["response"]]
    assert len(changed) == round(fraction * len(rows))
    assert [i for i, r in enumerate(noisy) if r["noisy"]] == changed
    for clean, new in zip(rows, noisy):
        assert new["answer"] == clean["answer"] and new["prompt"] == clean["prompt"]
        task = get_task(new["task"])
        assert task.check(new["response"], new) == (not new["noisy"])


def test_noise_is_deterministic_and_seeded():
    rows = TASKS["sort"].generate(50, seed=0)
    assert noise(rows, 0.3, seed=1) == noise(rows, 0.3, seed=1)
    picked = lambda out: [i for i, r in enumerate(out) if r["noisy"]]  # noqa: E731
    assert picked(noise(rows, 0.3, seed=1)) != picked(noise(rows, 0.3, seed=2))


def test_noise_without_task_swaps_responses():
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    out = noise(rows, 1.0, seed=0)
    responses = {f"a{i}" for i in range(10)} | {"hello"}
    for old, new in zip(rows, out):
        if "messages" in old:
            assert new["messages"][0] == old["messages"][0]
            assert new["messages"][1]["content"] in responses - {"hello"}
        else:
            assert new["response"] != old["response"] and new["response"] in responses
    with pytest.raises(ValueError, match="same response"):
        noise([{"prompt": "a", "response": "x"}, {"prompt": "b", "response": "x"}], 0.5, seed=0)
    with pytest.raises(ValueError):
        noise(rows, 1.5, seed=0)


# --------------------------------------------------------------------------- past tense


def test_past_tense_truth_table_spot_checks():
    from bnll_lightning.tasks import DOUBLED_PAST, IRREGULAR_PAST, PAST_TENSE, regular_past

    hand_written = {
        "stop": "stopped", "try": "tried", "play": "played", "bake": "baked", "fix": "fixed", "visit": "visited",
        "prefer": "preferred", "admit": "admitted", "agree": "agreed", "obey": "obeyed", "cry": "cried",
        "tie": "tied", "carry": "carried", "open": "opened", "answer": "answered", "plan": "planned",
        "go": "went", "eat": "ate", "swim": "swam", "teach": "taught", "bring": "brought", "begin": "began",
        "see": "saw", "find": "found", "lay": "laid", "think": "thought", "fly": "flew", "hang": "hung",
    }  # fmt: skip
    for verb, past in hand_written.items():
        assert PAST_TENSE[verb][0] == past, verb
    assert PAST_TENSE["dream"] == ("dreamed", "dreamt") and PAST_TENSE["learn"] == ("learned", "learnt")
    for verb, past in {"bake": "baked", "try": "tried", "play": "played", "fix": "fixed", "obey": "obeyed",
                       "agree": "agreed", "visit": "visited"}.items():  # fmt: skip
        assert regular_past(verb) == past
    # left out: the past spelled like the base ("put"), -c verbs ("panic"), British/American spellings ("travel"),
    # a base form that is another verb's past or has a homonym with another past ("found", "lie")
    for verb in ("put", "cut", "read", "panic", "travel", "found", "lie", "wind"):
        assert verb not in PAST_TENSE
    assert len(IRREGULAR_PAST) >= 150 and len(DOUBLED_PAST) >= 100


def test_past_tense_table_is_consistent():
    from bnll_lightning.tasks import _REGULAR_VERBS, DOUBLED_PAST, IRREGULAR_PAST, PAST_TENSE

    assert len(PAST_TENSE) == len(_REGULAR_VERBS) + len(DOUBLED_PAST) + len(IRREGULAR_PAST)  # no verb twice
    canonical = [forms[0] for forms in PAST_TENSE.values()]
    assert len(set(canonical)) == len(canonical)  # corrupt() finds the verb from its past
    for verb, forms in PAST_TENSE.items():
        assert verb.isalpha() and verb.islower() and all(f.isalpha() and f.islower() for f in forms)
        assert verb not in forms  # an echo of the question never reads as a right answer
        assert verb not in canonical  # a base form is no verb's past
    # a one-syllable consonant-vowel-consonant verb doubles its consonant: it must not be spelled by rule
    one_syllable_cvc = re.compile(r"[^aeiou]*[aeiou][^aeiouwxy]")
    assert not [v for v in _REGULAR_VERBS if one_syllable_cvc.fullmatch(v)]
    assert all(one_syllable_cvc.fullmatch(v) for v in ("stop", "plan", "hug", "stir"))


def test_past_tense_checker_and_corruption():
    task = TASKS["past_tense"]
    dreamed = _row("past_tense", "dreamed")
    for good in ("dreamed", "dreamt", 'The past tense of "dream" is "dreamt".'):
        assert task.check(good, dreamed)
    for bad in ("dream", "dreams", "dreaming"):
        assert not task.check(bad, dreamed)
    assert task.spellings("dreamed") == ("dreamed", "dreamt") and task.spellings("went") == ("went",)
    rng = random.Random(0)
    assert not task.check("stoped", _row("past_tense", "stopped"))
    assert {task.corrupt("went", rng) for _ in range(200)} >= {"goed", "go"}
    assert {task.corrupt("stopped", rng) for _ in range(200)} >= {"stoped", "stop"}
    assert "tryed" in {task.corrupt("tried", rng) for _ in range(200)}
    for forms in task.table.values():  # never the answer nor another accepted spelling of it
        for _ in range(5):
            wrong = task.corrupt(forms[0], rng)
            assert wrong not in forms and not task.check(wrong, _row("past_tense", forms[0]))


def test_past_tense_has_enough_distinct_prompts():
    """200 held-out items from the evaluation stream (benchmarks/continuum.py ``_eval_rows``, seed 1_000_003)
    and a pool of 300 more (benchmarks/noise_study.py ``candidate_rows``, seed 7919 * 999)."""
    task = TASKS["past_tense"]

    def distinct(rows, n, exclude=()):
        out, seen = [], set(exclude)
        for row in rows:
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                out.append(row["prompt"])
        return out[:n]

    assert len({task.sample(random.Random(i))[0] for i in range(20000)}) == len(task.table) >= 550
    held_out = distinct(task.generate(50 * 200, 1_000_003), 200)
    pool = distinct(task.generate(50 * 300, 7919 * 999), 300, exclude=held_out)
    assert len(held_out) == 200 and len(pool) == 300

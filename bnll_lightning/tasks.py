"""Built-in offline tasks: procedurally generated SFT rows with an answer checker.

Every task is deterministic under a seed and needs no download. A task generates rows::

    {"prompt": str, "response": str, "answer": str, "task": str}

* ``prompt`` is a plain instruction for an instruct model (it ends by asking for only the answer);
* ``response`` is the training target. For every built-in task the response is **exactly the
  canonical answer** (no sentence around it), e.g. ``"4, 9, 17"``, ``"omulek"``, ``"81"``, ``"CAT"``,
  ``"Paris"``, ``"GREEN APPLE"``, ``"mice"``. Short targets keep CPU training cheap;
* ``answer`` is the ground truth the checker compares against. :func:`noise` corrupts ``response``
  and never touches ``answer``, so evaluation always scores against the truth;
* ``task`` is the task name (so mixed or noisy rows can still find their checker).

``Task.check(prediction, row)`` accepts a model's natural answer format. Common rules (all tasks):
the answer is looked for in the **final line** of the prediction (the last non-empty line that is
not just markdown decoration such as a code fence; for the number tasks, the last line that
contains a digit); surrounding quotes, backticks, ``**bold**`` markers and a trailing period are
ignored; ``The answer is X.`` / ``Result: X`` forms are accepted (the text after the last ``:``,
``=``, ``->``, ``is``, ``are`` is tried). Per-task details are in each class docstring.

Registry: :data:`TASKS` (name -> task) and :func:`get_task`.
"""

from __future__ import annotations

import copy
import random
import re
import unicodedata
from typing import Any

__all__ = [
    "TASKS",
    "AddTask",
    "CapitalTask",
    "FigletTask",
    "PastTenseTask",
    "PluralTask",
    "ReverseTask",
    "SortTask",
    "SuccessorTask",
    "Task",
    "UppercaseTask",
    "final_line",
    "get_task",
    "noise",
]

# --------------------------------------------------------------------------------------------
# Answer extraction helpers (shared by the checkers)
# --------------------------------------------------------------------------------------------

_DECORATION_LINE = re.compile(r"[\s`'\"*_~\-=#>.:]*")
_QUOTE_CHARS = "\"'`*_“”‘’«»"
_TAIL_MARKER = re.compile(r"(?::|=|->|→|\bis\b|\bare\b|\bgives\b)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”|`([^`]+)`|\*\*([^*]+)\*\*|'([^']+)'|‘([^’]+)’")
_LETTER_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")


def final_line(text: str, *, need_digit: bool = False) -> str:
    """The last non-empty line of ``text`` that is not pure decoration (code fence, rule, quotes).

    With ``need_digit`` the last line containing a digit is returned instead ("" if none).
    """
    lines = [line.strip() for line in str(text).strip().splitlines()]
    for line in reversed(lines):
        if not line or _DECORATION_LINE.fullmatch(line):
            continue
        if need_digit and not any(ch.isdigit() for ch in line):
            continue
        return line
    return ""


def _clean(text: str) -> str:
    """Strip whitespace, wrapping quotes/backticks/bold markers and trailing punctuation."""
    prev = None
    text = text.strip()
    while text != prev:
        prev = text
        text = text.strip().strip(_QUOTE_CHARS).rstrip(".!?;,").strip()
    return text


def _tail(line: str) -> str:
    """Text after the last answer marker (``:``, ``=``, ``->``, ``is``, ...), or the line itself."""
    last = None
    for last in _TAIL_MARKER.finditer(line):
        pass
    return line[last.end():] if last is not None else line


def _numbers(text: str) -> list[float]:
    return [float(m) for m in _NUMBER.findall(text)]


def _word_candidates(line: str, n_words: int) -> set[str]:
    """Plausible spellings of a short word answer found in ``line``."""
    tail = _tail(line)
    cands = {_clean(line), _clean(tail)}
    quoted = [next(g for g in m.groups() if g is not None) for m in _QUOTED.finditer(line)]
    if quoted:
        cands.add(_clean(quoted[-1]))
    words = _LETTER_WORD.findall(line)
    if len(words) >= n_words:
        cands.add(" ".join(words[-n_words:]))
    # Spelled out letter by letter: "o l l e h", "C-A-T", "C, A, T".
    parts = [p for p in re.split(r"[\s,\-.]+", _clean(tail)) if p]
    if len(parts) > 1 and all(len(p) == 1 for p in parts):
        cands.add("".join(parts))
    cands.discard("")
    return cands


def _fold(text: str) -> str:
    """Case- and accent-insensitive form: NFKD, drop combining marks, casefold, drop '.' and
    apostrophes, other punctuation -> space, collapse whitespace."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    text = re.sub(r"[.'’]", "", text)
    text = re.sub(r"[^\w]+", " ", text)
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Task base class
# --------------------------------------------------------------------------------------------


class Task:
    """A procedurally generated task. Subclasses implement :meth:`sample`, :meth:`corrupt` and
    :meth:`check`; :meth:`generate` is shared and deterministic in ``(name, seed)``."""

    name: str = ""
    description: str = ""

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """Draw one ``(prompt, answer)`` pair."""
        raise NotImplementedError

    def respond(self, answer: str) -> str:
        """The training response for an answer (all built-in tasks: the answer itself)."""
        return answer

    def spellings(self, answer: str) -> tuple[str, ...]:
        """The ways ``answer`` may be written in a correct response (the canonical one first)."""
        return (answer,)

    def corrupt(self, answer: str, rng: random.Random) -> str:
        """A plausible but wrong answer, guaranteed ``!= answer`` (used by :func:`noise`)."""
        raise NotImplementedError

    def check(self, prediction: str, row: dict[str, Any]) -> bool:
        """Whether a free-form model ``prediction`` is correct for ``row`` (uses ``row["answer"]``)."""
        raise NotImplementedError

    def generate(self, n: int, seed: int) -> list[dict[str, str]]:
        """``n`` rows drawn from a stream determined by ``(self.name, seed)``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"bnll_lightning.tasks:{self.name}:{int(seed)}")
        rows = []
        for _ in range(n):
            prompt, answer = self.sample(rng)
            rows.append(
                {"prompt": prompt, "response": self.respond(answer), "answer": answer, "task": self.name}
            )
        return rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class _WordTask(Task):
    """Shared checker for single-word/short-phrase answers.

    Accepted: the whole final line, the text after the last marker (``is``, ``:``...), the last
    quoted span (``"x"``, ``'x'``, `` `x` ``, ``**x**``), the last N words of the line (N = words in
    the answer) or a letter-by-letter spelling (``o-l-l-e-h``, ``C A T``), each after stripping
    quotes and a trailing period. Comparison is case-insensitive unless ``case_sensitive``.
    """

    case_sensitive = False

    def check(self, prediction: str, row: dict[str, Any]) -> bool:
        answer = str(row["answer"]).strip()
        cands = _word_candidates(final_line(prediction), len(answer.split()) or 1)
        if self.case_sensitive:
            return answer in cands
        return answer.casefold() in {c.casefold() for c in cands}

    @staticmethod
    def _mutate_letter(word: str, rng: random.Random, alphabet: str) -> str:
        """Replace one letter by a different one from ``alphabet`` (always changes ``word``)."""
        positions = [i for i, ch in enumerate(word) if ch.isalpha()]
        i = rng.choice(positions)
        new = rng.choice([c for c in alphabet if c != word[i]])
        return word[:i] + new + word[i + 1:]


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


class SortTask(Task):
    """Sort 3-5 distinct integers in 0..99 ascending. Response: ``"4, 9, 17"``.

    Check: in the last line containing a digit, the list of numbers equals the sorted list, either
    for the whole line (``[4, 9, 17]``, ``4 9 17``) or for the text after the last marker
    (``Sorted: 4, 9, 17.``, ``The sorted list is 4, 9, 17``). ``17, 9, 4`` or a missing number fail.
    """

    name = "sort"
    description = "sort a short list of integers ascending"

    def sample(self, rng):
        nums = rng.sample(range(100), rng.randint(3, 5))
        prompt = (
            f"Sort these numbers in ascending order: {', '.join(map(str, nums))}. "
            "Reply with only the sorted numbers, separated by commas."
        )
        return prompt, ", ".join(map(str, sorted(nums)))

    def corrupt(self, answer, rng):
        nums = answer.split(", ")
        wrong = nums[:]
        while wrong == nums:
            rng.shuffle(wrong)
        return ", ".join(wrong)

    def check(self, prediction, row):
        target = [float(x) for x in str(row["answer"]).split(",")]
        line = final_line(prediction, need_digit=True)
        return _numbers(line) == target or _numbers(_tail(line)) == target


class ReverseTask(_WordTask):
    """Reverse the letters of a short pronounceable pseudo-word (4-6 lowercase letters by default,
    never a palindrome). Pseudo-words keep the row space large, so validation rows stay disjoint from
    training rows. Response: the reversed word, e.g. ``"omulek"``.

    Check: word rules (case-insensitive), e.g. ``omulek``, ``"omulek".``,
    ``The reversed word is omulek.``, ``o-m-u-l-e-k``. The original word fails.
    """

    name = "reverse"
    description = "reverse the letters of a short word"
    _consonants = "bdfgklmnprstvz"
    _vowels = "aeiou"

    def __init__(self, name: str = "reverse", min_length: int = 4, max_length: int = 6) -> None:
        self.name, self.min_length, self.max_length = name, min_length, max_length

    def sample(self, rng):
        while True:
            length = rng.randint(self.min_length, self.max_length)
            start = rng.randint(0, 1)
            word = "".join(
                rng.choice(self._consonants if (i + start) % 2 == 0 else self._vowels) for i in range(length)
            )
            if word != word[::-1]:
                break
        prompt = f'Reverse the letters of the word "{word}". Reply with only the reversed word.'
        return prompt, word[::-1]

    def corrupt(self, answer, rng):
        original = answer[::-1]  # the un-reversed word: the most natural mistake
        if original != answer and rng.random() < 0.5:
            return original
        return self._mutate_letter(answer, rng, "abcdefghijklmnopqrstuvwxyz")


class AddTask(Task):
    """Add two integers in 0..99. Response: the sum, e.g. ``"81"``.

    Check: the last number on the last line containing a digit equals the sum (``81``, ``81.``,
    ``23 + 58 = 81``, ``The answer is 81.``, ``81.0``).
    """

    name = "add"
    description = "add two small integers"

    def sample(self, rng):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} + {b}? Reply with only the number.", str(a + b)

    def corrupt(self, answer, rng):
        value = int(answer)
        delta = rng.choice([d for d in range(-10, 11) if d != 0 and value + d >= 0])
        return str(value + delta)

    def check(self, prediction, row):
        nums = _numbers(final_line(prediction, need_digit=True))
        return bool(nums) and nums[-1] == float(row["answer"])


class SuccessorTask(Task):
    """The integer that follows ``n``, for n in 0..998 (999 distinct rows): counting, which a small
    instruct model already does, with enough distinct rows for a held-out set of hundreds.
    Response: e.g. ``"348"``.

    Check: the last number on the last line containing a digit is n + 1 (``348``,
    ``The number after 347 is 348.``).
    """

    name = "successor"
    description = "the number that comes after n"

    def sample(self, rng):
        n = rng.randint(0, 998)
        return f"Which number comes right after {n}? Reply with only the number.", str(n + 1)

    def corrupt(self, answer, rng):
        value = int(answer)
        # Off-by-one and off-by-ten slips: wrong answers a counting model finds plausible.
        return str(value + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if value + d >= 0]))

    def check(self, prediction, row):
        nums = _numbers(final_line(prediction, need_digit=True))
        return bool(nums) and nums[-1] == float(row["answer"])


class FigletTask(_WordTask):
    """Read a 1-3 letter uppercase random word drawn in FIGlet ASCII art (pyfiglet, font
    "standard"); the art is given in a fenced ```` ```text ```` block. This is the task a small
    model is weak at. Response: the letters, e.g. ``"CAT"``.

    Check: word rules, case-insensitive (``CAT``, ``cat``, ``The word is "CAT".``, ``C A T``).
    """

    name = "figlet"
    description = "read a 1-3 letter word rendered in FIGlet ASCII art"
    font = "standard"
    _letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

    def __init__(self) -> None:
        self._figlet = None

    def render(self, word: str) -> str:
        """The art for ``word``: trailing spaces and blank first/last lines removed."""
        if self._figlet is None:
            import pyfiglet

            self._figlet = pyfiglet.Figlet(font=self.font)
        lines = [line.rstrip() for line in self._figlet.renderText(word).splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        while lines and not lines[0]:
            lines.pop(0)
        return "\n".join(lines)

    def sample(self, rng):
        word = "".join(rng.choice(self._letters) for _ in range(rng.randint(1, 3)))
        prompt = (
            "Which word is written in the ASCII art below? Reply with only the word, in uppercase letters."
            f"\n\n```text\n{self.render(word)}\n```"
        )
        return prompt, word

    def corrupt(self, answer, rng):
        return self._mutate_letter(answer, rng, self._letters)


# Country -> capital; extra accepted spellings after the canonical one.
CAPITALS: dict[str, tuple[str, ...]] = {
    "France": ("Paris",),
    "Germany": ("Berlin",),
    "Italy": ("Rome", "Roma"),
    "Spain": ("Madrid",),
    "Portugal": ("Lisbon", "Lisboa"),
    "the United Kingdom": ("London",),
    "Ireland": ("Dublin",),
    "the Netherlands": ("Amsterdam",),
    "Belgium": ("Brussels", "Bruxelles"),
    "Austria": ("Vienna", "Wien"),
    "Sweden": ("Stockholm",),
    "Norway": ("Oslo",),
    "Denmark": ("Copenhagen",),
    "Finland": ("Helsinki",),
    "Poland": ("Warsaw",),
    "Greece": ("Athens",),
    "Russia": ("Moscow",),
    "Ukraine": ("Kyiv", "Kiev"),
    "Hungary": ("Budapest",),
    "the Czech Republic": ("Prague",),
    "Turkey": ("Ankara",),
    "Egypt": ("Cairo",),
    "Kenya": ("Nairobi",),
    "Nigeria": ("Abuja",),
    "Morocco": ("Rabat",),
    "Ethiopia": ("Addis Ababa",),
    "Japan": ("Tokyo",),
    "China": ("Beijing", "Peking"),
    "South Korea": ("Seoul",),
    "India": ("New Delhi",),
    "Thailand": ("Bangkok",),
    "Vietnam": ("Hanoi",),
    "Indonesia": ("Jakarta",),
    "the Philippines": ("Manila",),
    "Australia": ("Canberra",),
    "New Zealand": ("Wellington",),
    "Canada": ("Ottawa",),
    "the United States": ("Washington, D.C.", "Washington", "Washington DC"),
    "Mexico": ("Mexico City",),
    "Brazil": ("Brasília", "Brasilia"),
    "Argentina": ("Buenos Aires",),
    "Chile": ("Santiago",),
    "Peru": ("Lima",),
    "Colombia": ("Bogotá", "Bogota"),
    "Cuba": ("Havana",),
    "Iran": ("Tehran",),
    "Iraq": ("Baghdad",),
    "Saudi Arabia": ("Riyadh",),
    "Pakistan": ("Islamabad",),
    "Afghanistan": ("Kabul",),
}


class CapitalTask(Task):
    """Country -> capital from a built-in table: a knowledge task a small instruct model may already
    do. ``capital`` uses :data:`CAPITALS` (50 well-known pairs: a validation set cannot be fully
    disjoint from a large training set); ``world_capital`` uses :data:`WORLD_CAPITALS` (189 countries,
    enough for a held-out set of ~100). Response: the capital, e.g. ``"Paris"``.

    Check: on the final line (case/accent/punctuation-insensitive) the capital or one of its
    accepted spellings appears as a whole phrase (``Paris``, ``paris.``, ``The capital of France is
    Paris.``, ``Paris is the capital.``, ``Brasilia`` for ``Brasília``, ``Washington`` for
    ``Washington, D.C.``) and no other capital of the table appears (``Paris or Berlin`` fails).
    """

    description = "name the capital of a country"

    def __init__(self, name: str = "capital", table: dict[str, tuple[str, ...]] | None = None) -> None:
        self.name = name
        self.table = CAPITALS if table is None else table
        self._by_answer = {names[0]: names for names in self.table.values()}

    def sample(self, rng):
        country = rng.choice(list(self.table))
        prompt = f"What is the capital of {country}? Reply with only the name of the city."
        return prompt, self.table[country][0]

    def spellings(self, answer):
        return self._by_answer.get(answer, (answer,))

    def corrupt(self, answer, rng):
        return rng.choice([a for a in self._by_answer if a != answer])

    def check(self, prediction, row):
        line = f" {_fold(final_line(prediction))} "
        answer = str(row["answer"])
        names = self._by_answer.get(answer, (answer,))

        def mentioned(options) -> bool:
            return any(f" {_fold(o)} " in line for o in options)

        if not mentioned(names):
            return False
        return not any(mentioned(other) for a, other in self._by_answer.items() if a != answer and a not in names)


# The UN's member and observer states (189): the knowledge base of ``world_capital``. Canonical name first, then
# accepted spellings or other official seats (Bolivia, South Africa, Sri Lanka). City-states named like their capital
# (Monaco, Singapore, ...) are left out: the echoed question would read as a right answer.
WORLD_CAPITALS: dict[str, tuple[str, ...]] = {
"Afghanistan": ("Kabul",), "Albania": ("Tirana", "Tirane"), "Algeria": ("Algiers",), "Andorra": ("Andorra la Vella",),
"Angola": ("Luanda",), "Antigua and Barbuda": ("St. John's", "Saint John's"), "Argentina": ("Buenos Aires",),
"Armenia": ("Yerevan",), "Australia": ("Canberra",), "Austria": ("Vienna", "Wien"), "Azerbaijan": ("Baku",),
"the Bahamas": ("Nassau",), "Bahrain": ("Manama",), "Bangladesh": ("Dhaka", "Dacca"), "Barbados": ("Bridgetown",),
"Belarus": ("Minsk",), "Belgium": ("Brussels", "Bruxelles"), "Belize": ("Belmopan",), "Benin": ("Porto-Novo", "Porto Novo"),
"Bhutan": ("Thimphu",), "Bolivia": ("Sucre", "La Paz"), "Bosnia and Herzegovina": ("Sarajevo",), "Botswana": ("Gaborone",),
"Brazil": ("Brasília", "Brasilia"), "Brunei": ("Bandar Seri Begawan",), "Bulgaria": ("Sofia",), "Burkina Faso": ("Ouagadougou",),
"Burundi": ("Gitega", "Bujumbura"), "Cambodia": ("Phnom Penh",), "Cameroon": ("Yaoundé", "Yaounde"), "Canada": ("Ottawa",),
"Cape Verde": ("Praia",), "the Central African Republic": ("Bangui",), "Chad": ("N'Djamena", "Ndjamena"), "Chile": ("Santiago",),
"China": ("Beijing", "Peking"), "Colombia": ("Bogotá", "Bogota"), "the Comoros": ("Moroni",), "the Republic of the Congo": ("Brazzaville",),
"the Democratic Republic of the Congo": ("Kinshasa",), "Costa Rica": ("San José", "San Jose"), "Croatia": ("Zagreb",), "Cuba": ("Havana", "La Habana"),
"Cyprus": ("Nicosia",), "the Czech Republic": ("Prague", "Praha"), "Denmark": ("Copenhagen",), "Dominica": ("Roseau",), "the Dominican Republic": ("Santo Domingo",), "Ecuador": ("Quito",), "Egypt": ("Cairo",),
"El Salvador": ("San Salvador",), "Equatorial Guinea": ("Malabo",), "Eritrea": ("Asmara",), "Estonia": ("Tallinn",),
"Eswatini": ("Mbabane", "Lobamba"), "Ethiopia": ("Addis Ababa",), "Fiji": ("Suva",), "Finland": ("Helsinki",), "France": ("Paris",),
"Gabon": ("Libreville",), "the Gambia": ("Banjul",), "Georgia": ("Tbilisi",), "Germany": ("Berlin",), "Ghana": ("Accra",),
"Greece": ("Athens",), "Grenada": ("St. George's", "Saint George's"), "Guatemala": ("Guatemala City",), "Guinea": ("Conakry",),
"Guinea-Bissau": ("Bissau",), "Guyana": ("Georgetown",), "Haiti": ("Port-au-Prince", "Port au Prince"), "Honduras": ("Tegucigalpa",),
"Hungary": ("Budapest",), "Iceland": ("Reykjavik", "Reykjavík"), "India": ("New Delhi",), "Indonesia": ("Jakarta",),
"Iran": ("Tehran", "Teheran"), "Iraq": ("Baghdad",), "Ireland": ("Dublin",), "Israel": ("Jerusalem",), "Italy": ("Rome", "Roma"),
"Ivory Coast": ("Yamoussoukro",), "Jamaica": ("Kingston",), "Japan": ("Tokyo",), "Jordan": ("Amman",), "Kazakhstan": ("Astana",),
"Kenya": ("Nairobi",), "Kiribati": ("Tarawa", "South Tarawa"), "Kuwait": ("Kuwait City",), "Kyrgyzstan": ("Bishkek",),
"Laos": ("Vientiane",), "Latvia": ("Riga",), "Lebanon": ("Beirut",), "Lesotho": ("Maseru",), "Liberia": ("Monrovia",),
"Libya": ("Tripoli",), "Liechtenstein": ("Vaduz",), "Lithuania": ("Vilnius",), "Madagascar": ("Antananarivo",), "Malawi": ("Lilongwe",), "Malaysia": ("Kuala Lumpur",), "the Maldives": ("Malé", "Male"),
"Mali": ("Bamako",), "Malta": ("Valletta",), "the Marshall Islands": ("Majuro",), "Mauritania": ("Nouakchott",),
"Mauritius": ("Port Louis",), "Mexico": ("Mexico City",), "Micronesia": ("Palikir",), "Moldova": ("Chișinău", "Chisinau"),
"Mongolia": ("Ulaanbaatar", "Ulan Bator"), "Montenegro": ("Podgorica",), "Morocco": ("Rabat",),
"Mozambique": ("Maputo",), "Myanmar": ("Naypyidaw", "Nay Pyi Taw"), "Namibia": ("Windhoek",), "Nauru": ("Yaren",),
"Nepal": ("Kathmandu",), "the Netherlands": ("Amsterdam",), "New Zealand": ("Wellington",), "Nicaragua": ("Managua",),
"Niger": ("Niamey",), "Nigeria": ("Abuja",), "North Korea": ("Pyongyang",), "North Macedonia": ("Skopje",), "Norway": ("Oslo",),
"Oman": ("Muscat",), "Pakistan": ("Islamabad",), "Palau": ("Ngerulmud",), "Panama": ("Panama City",),
"Papua New Guinea": ("Port Moresby",), "Paraguay": ("Asunción", "Asuncion"), "Peru": ("Lima",), "the Philippines": ("Manila",),
"Poland": ("Warsaw",), "Portugal": ("Lisbon", "Lisboa"), "Qatar": ("Doha",), "Romania": ("Bucharest",), "Russia": ("Moscow",),
"Rwanda": ("Kigali",), "Saint Kitts and Nevis": ("Basseterre",), "Saint Lucia": ("Castries",),
"Saint Vincent and the Grenadines": ("Kingstown",), "Samoa": ("Apia",), "São Tomé and Príncipe": ("São Tomé", "Sao Tome"), "Saudi Arabia": ("Riyadh",), "Senegal": ("Dakar",), "Serbia": ("Belgrade",),
"Seychelles": ("Victoria",), "Sierra Leone": ("Freetown",), "Slovakia": ("Bratislava",),
"Slovenia": ("Ljubljana",), "the Solomon Islands": ("Honiara",), "Somalia": ("Mogadishu",), "South Africa": ("Pretoria", "Cape Town", "Bloemfontein"),
"South Korea": ("Seoul",), "South Sudan": ("Juba",), "Spain": ("Madrid",), "Sri Lanka": ("Sri Jayawardenepura Kotte", "Kotte", "Colombo"),
"Sudan": ("Khartoum",), "Suriname": ("Paramaribo",), "Sweden": ("Stockholm",), "Switzerland": ("Bern", "Berne"), "Syria": ("Damascus",),
"Taiwan": ("Taipei",), "Tajikistan": ("Dushanbe",), "Tanzania": ("Dodoma",), "Thailand": ("Bangkok",), "East Timor": ("Dili",),
"Togo": ("Lomé", "Lome"), "Tonga": ("Nukuʻalofa", "Nuku'alofa", "Nukualofa"), "Trinidad and Tobago": ("Port of Spain", "Port-of-Spain"),
"Tunisia": ("Tunis",), "Turkey": ("Ankara",), "Turkmenistan": ("Ashgabat",), "Tuvalu": ("Funafuti",), "Uganda": ("Kampala",),
"Ukraine": ("Kyiv", "Kiev"), "the United Arab Emirates": ("Abu Dhabi",), "the United Kingdom": ("London",),
"the United States": ("Washington, D.C.", "Washington", "Washington DC"), "Uruguay": ("Montevideo",), "Uzbekistan": ("Tashkent",),
"Vanuatu": ("Port Vila",), "Venezuela": ("Caracas",), "Vietnam": ("Hanoi",), "Yemen": ("Sanaa", "Sana'a"), "Zambia": ("Lusaka",),
"Zimbabwe": ("Harare",),
}


_WORDS = (
    "apple banana orange lemon grape cherry river mountain forest ocean desert island garden "
    "window door table chair pencil paper book letter music water fire stone cloud storm "
    "green blue red yellow purple silver golden quiet happy little bright gentle rapid "
    "tiger horse rabbit eagle dolphin turtle spider candle bridge castle rocket planet "
    "winter summer morning evening coffee bread honey sugar pepper"
).split()


class UppercaseTask(_WordTask):
    """Convert one or two common lowercase words to uppercase (an instruct model already does
    this in its own words). Response: e.g. ``"GREEN APPLE"``.

    Check: word rules but **case-sensitive** (the case is the point): ``GREEN APPLE``,
    ``"GREEN APPLE".``, ``The uppercase text is GREEN APPLE.``; ``green apple`` / ``Green Apple``
    fail.
    """

    name = "uppercase"
    description = "convert words to uppercase"
    case_sensitive = True

    def sample(self, rng):
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 2)))
        prompt = f'Convert "{text}" to uppercase. Reply with only the converted text.'
        return prompt, text.upper()

    def corrupt(self, answer, rng):
        if rng.random() < 0.5:  # the classic mistake: not converting everything
            wrong = answer.title()
            if wrong != answer:
                return wrong
        return self._mutate_letter(answer, rng, "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


# Singular -> plural (regular, -es, -ies, -ves and irregular forms).
PLURALS: dict[str, str] = {
    "cat": "cats", "dog": "dogs", "book": "books", "tree": "trees", "car": "cars",
    "house": "houses", "bird": "birds", "apple": "apples", "river": "rivers", "cup": "cups",
    "box": "boxes", "bus": "buses", "church": "churches", "dish": "dishes", "fox": "foxes",
    "glass": "glasses", "watch": "watches", "tomato": "tomatoes", "potato": "potatoes", "hero": "heroes",
    "city": "cities", "baby": "babies", "party": "parties", "story": "stories", "lady": "ladies",
    "knife": "knives", "leaf": "leaves", "wolf": "wolves", "wife": "wives", "half": "halves",
    "shelf": "shelves", "loaf": "loaves", "child": "children", "man": "men", "woman": "women",
    "mouse": "mice", "goose": "geese", "tooth": "teeth", "foot": "feet", "person": "people",
    "ox": "oxen", "cactus": "cacti", "fungus": "fungi", "crisis": "crises", "analysis": "analyses",
    "phenomenon": "phenomena", "criterion": "criteria", "key": "keys", "day": "days", "toy": "toys",
}


class PluralTask(_WordTask):
    """Plural of an English noun from a built-in list of 50 (:data:`PLURALS`, regular and
    irregular): a word transformation an instruct model likely already does. Response: e.g.
    ``"mice"``. Only 50 distinct rows exist.

    Check: word rules, case-insensitive: ``mice``, ``Mice.``, ``The plural of mouse is mice.``;
    ``mouses`` fails.
    """

    name = "plural"
    description = "give the plural of a noun"

    def sample(self, rng):
        word = rng.choice(list(PLURALS))
        prompt = f'What is the plural of the noun "{word}"? Reply with only the plural.'
        return prompt, PLURALS[word]

    def corrupt(self, answer, rng):
        singular = next((s for s, p in PLURALS.items() if p == answer), answer)
        wrong = [w for w in (singular + "s", singular + "es", singular) if w != answer]
        return rng.choice(wrong)


# Irregular verbs: base -> simple past, the accepted spellings (canonical first; a second form where
# dictionaries give both, e.g. "dreamed"/"dreamt"). Left out: verbs whose past may be spelled like the base
# form ("put", "cut", "read": an echo of the question would read as a right answer), and verbs whose base
# form is another verb's past or has a homonym with another past ("found", "wind", "lie" -> "lay"/"lied").
IRREGULAR_PAST: dict[str, tuple[str, ...]] = {
    "arise": ("arose",), "awake": ("awoke", "awaked"), "bear": ("bore",), "become": ("became",),
    "befall": ("befell",), "begin": ("began",), "behold": ("beheld",), "bend": ("bent",), "bind": ("bound",),
    "bite": ("bit",), "bleed": ("bled",), "blow": ("blew",), "break": ("broke",), "breed": ("bred",),
    "bring": ("brought",), "build": ("built",), "burn": ("burned", "burnt"), "buy": ("bought",),
    "catch": ("caught",), "choose": ("chose",), "cling": ("clung",), "come": ("came",), "creep": ("crept",),
    "deal": ("dealt",), "dig": ("dug",), "dive": ("dived", "dove"), "do": ("did",), "draw": ("drew",),
    "dream": ("dreamed", "dreamt"), "drink": ("drank",), "drive": ("drove",), "dwell": ("dwelt", "dwelled"),
    "eat": ("ate",), "fall": ("fell",), "feed": ("fed",), "feel": ("felt",), "fight": ("fought",),
    "find": ("found",), "flee": ("fled",), "fling": ("flung",), "fly": ("flew",), "forbid": ("forbade", "forbad"),
    "foresee": ("foresaw",), "foretell": ("foretold",), "forget": ("forgot",), "forgive": ("forgave",),
    "forsake": ("forsook",), "freeze": ("froze",), "get": ("got",), "give": ("gave",), "go": ("went",),
    "grind": ("ground",), "grow": ("grew",), "hang": ("hung", "hanged"), "have": ("had",), "hear": ("heard",),
    "hide": ("hid",), "hold": ("held",), "keep": ("kept",), "kneel": ("knelt", "kneeled"), "know": ("knew",),
    "lay": ("laid",), "lead": ("led",), "lean": ("leaned", "leant"), "leap": ("leaped", "leapt"),
    "learn": ("learned", "learnt"), "leave": ("left",), "lend": ("lent",), "light": ("lit", "lighted"),
    "lose": ("lost",), "make": ("made",), "mean": ("meant",), "meet": ("met",), "mislead": ("misled",),
    "mistake": ("mistook",), "misunderstand": ("misunderstood",), "outdo": ("outdid",), "outgrow": ("outgrew",),
    "outrun": ("outran",), "overcome": ("overcame",), "overhear": ("overheard",), "oversee": ("oversaw",),
    "oversleep": ("overslept",), "overtake": ("overtook",), "overthrow": ("overthrew",), "partake": ("partook",),
    "pay": ("paid",), "plead": ("pleaded", "pled"), "rebuild": ("rebuilt",), "redo": ("redid",),
    "remake": ("remade",), "repay": ("repaid",), "resell": ("resold",), "retell": ("retold",),
    "rewrite": ("rewrote",), "ride": ("rode",), "ring": ("rang",), "rise": ("rose",), "run": ("ran",),
    "say": ("said",), "see": ("saw",), "seek": ("sought",), "sell": ("sold",), "send": ("sent",),
    "shake": ("shook",), "shine": ("shone", "shined"), "shoot": ("shot",), "shrink": ("shrank", "shrunk"),
    "sing": ("sang",), "sink": ("sank", "sunk"), "sit": ("sat",), "slay": ("slew", "slayed"), "sleep": ("slept",),
    "slide": ("slid",), "sling": ("slung",), "smell": ("smelled", "smelt"), "sneak": ("sneaked", "snuck"),
    "speak": ("spoke",), "speed": ("sped", "speeded"), "spell": ("spelled", "spelt"), "spend": ("spent",),
    "spill": ("spilled", "spilt"), "spin": ("spun",), "spoil": ("spoiled", "spoilt"),
    "spring": ("sprang", "sprung"), "stand": ("stood",), "steal": ("stole",), "stick": ("stuck",),
    "sting": ("stung",), "stink": ("stank", "stunk"), "stride": ("strode",), "strike": ("struck",),
    "string": ("strung",), "strive": ("strove", "strived"), "swear": ("swore",), "sweep": ("swept",),
    "swim": ("swam",), "swing": ("swung",), "take": ("took",), "teach": ("taught",), "tear": ("tore",),
    "tell": ("told",), "think": ("thought",), "throw": ("threw",), "tread": ("trod", "treaded"),
    "undergo": ("underwent",), "understand": ("understood",), "undertake": ("undertook",), "undo": ("undid",),
    "uphold": ("upheld",), "wake": ("woke", "waked"), "wear": ("wore",), "weave": ("wove", "weaved"),
    "weep": ("wept",), "win": ("won",), "withdraw": ("withdrew",), "withhold": ("withheld",),
    "withstand": ("withstood",), "wring": ("wrung",), "write": ("wrote",),
}

# Regular verbs that double their final consonant (one-syllable consonant-vowel-consonant verbs, and verbs
# stressed on a last such syllable): base -> past, written out.
DOUBLED_PAST: dict[str, str] = {
    verb: verb + verb[-1] + "ed"
    for verb in (
        "abhor acquit admit bag ban bar beg blot blur chat chip chop clap clog commit compel confer control "
        "dab deter dim dip drag drip drop drum emit equip expel fan flap flip flog gag grab grin hem hop hug hum "
        "incur jab jam jog jot knot log map mob mop nag nap nod occur omit pat patrol permit pet pin plan plod plot "
        "plug pop prefer prod propel rap rebel recur refer regret rip rob rot rub sag scan scar scrub ship shop "
        "shrug sip skip slam slap slip snap sob spot spur stab star step stir stop strap strip strum stun submit "
        "swap tag tan tap throb tip transmit trap trim trip trot tug wag whip wrap zip"
    ).split()
}

# Regular verbs spelled by rule (:func:`regular_past`): ``+d`` after a final e, ``y -> ied`` after a
# consonant, ``+ed`` otherwise. Left out: verbs spelled differently in British and American English
# ("travel", "realise"), verbs in -c ("panic"), and verbs whose base form is another verb's past ("found").
_REGULAR_VERBS = (
    "accept accuse ache achieve act add address admire adopt advise afford agree alert allow amuse announce "
    "annoy answer appear applaud apply appreciate approve argue arrange arrest arrive ask attach attack attempt "
    "attend attract avoid back bake balance bang bathe battle beam behave belong blink bless bloom blush boast "
    "boil bolt book borrow bother bounce bow box brake branch breathe brush bump bury buzz calculate call camp "
    "care carry carve cause challenge change charge chase cheat check cheer chew choke clean clear climb close "
    "coach collect comb command complain complete concentrate concern confess confuse connect consider consist "
    "contain continue copy correct cough count cover crack crash crawl cross crush cry cure curl cycle damage "
    "dance dare decay deceive decide decorate delay delight deliver deny depend describe deserve destroy detect "
    "develop disagree disappear discover dislike divide double doubt drain dress drown dry dust earn educate "
    "embarrass employ empty encourage end enjoy enter entertain escape examine excite excuse exercise exist "
    "expand expect explain explode extend face fade fail fancy fasten fear fence fetch file fill film fire fix "
    "flash float flood flow fold follow fool force form frame frighten fry gather gaze glow glue grate greet "
    "guarantee guard guess guide hammer hand handle happen harm hate haunt head heal heap heat help hook hope "
    "hover hunt hurry identify ignore imagine impress improve include increase influence inform inject injure "
    "instruct intend interest interfere interrupt introduce invent invite irritate itch jail joke judge juggle "
    "jump kick kill kiss knock land last laugh launch lick lift like list listen live load lock look love manage "
    "march mark marry match matter measure melt mend milk miss mix moan mourn move multiply murder nail name "
    "need nest note notice number obey object observe obtain offend offer open order owe own pack paddle paint "
    "park part pass paste pause peck peel perform phone pick pinch place plant play please point poke polish "
    "possess post pour pray preach prepare present preserve press pretend prevent print produce promise protect "
    "provide pull pump punch punish push question race rain raise reach receive record reduce reflect refuse "
    "reign reject rejoice relax release rely remain remember remind remove repair repeat replace reply report "
    "request rescue retire return rinse risk rock roll ruin rule rush sail satisfy save scare scatter scold "
    "scrape scratch scream screw seal search separate serve settle share shave shelter shiver shock sigh sign "
    "slow smash smile smoke snatch sneeze sniff snore snow soak sound spare spark sparkle spray squash squeak "
    "squeeze stain stamp stare start stay steer store stretch stroke stuff study subtract succeed suck suffer "
    "suggest suit supply support suppose surprise surround suspect suspend switch talk tame taste tease tempt "
    "terrify test thank thaw tick tickle tie tire touch tow trace trade train transport treat tremble trick "
    "trouble trust try tumble turn twist type unite unlock unpack use vanish visit wail wait walk wander want "
    "warm warn wash waste watch water wave weigh welcome whine whirl whisper whistle wink wipe wish wobble wonder "
    "work worry wreck wrestle yawn yell zoom"
).split()


def regular_past(verb: str) -> str:
    """The past tense of a regular verb that does not double its final consonant: ``bake -> baked``,
    ``try -> tried``, ``play -> played``, ``fix -> fixed``, ``visit -> visited``."""
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and len(verb) > 1 and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


# Every verb of the task: base -> accepted past forms (canonical first).
PAST_TENSE: dict[str, tuple[str, ...]] = {
    **{verb: (regular_past(verb),) for verb in _REGULAR_VERBS},
    **{verb: (past,) for verb, past in DOUBLED_PAST.items()},
    **IRREGULAR_PAST,
}


class PastTenseTask(_WordTask):
    """The simple past of an English verb from a built-in table of 779 (:data:`PAST_TENSE`: the 160
    irregular verbs of :data:`IRREGULAR_PAST` written out, the 119 doubling verbs of :data:`DOUBLED_PAST`,
    500 regular verbs spelled by :func:`regular_past`): knowledge a small instruct model has, with enough
    distinct rows for a held-out set of 200 and a training pool of 300 more. Response: e.g. ``"went"``.
    The embedded SmolLM2-135M-Instruct is right on 47 % of 200 held-out verbs (13 of 45 irregular ones),
    in its own words (``The past tense of "call" is "called."``).

    Check: word rules, case-insensitive, against the canonical past or another accepted spelling (``went``,
    ``Went.``, ``The past tense of "go" is "went".``; ``dreamt`` for ``dreamed``); ``goed``, ``gone`` and
    ``go`` fail. Corruption: the regularised form (``goed``, ``stoped``, ``tryed``) or the base form, else
    another verb's past.
    """

    name = "past_tense"
    description = "give the simple past of an English verb"

    def __init__(self) -> None:
        self.table = PAST_TENSE
        self._verbs = list(self.table)
        self._verb_of = {forms[0]: verb for verb, forms in self.table.items()}

    def sample(self, rng):
        verb = rng.choice(self._verbs)
        prompt = f'What is the past tense of "{verb}"? Reply with only the past tense.'
        return prompt, self.table[verb][0]

    def spellings(self, answer):
        verb = self._verb_of.get(answer)
        return self.table[verb] if verb is not None else (answer,)

    def corrupt(self, answer, rng):
        right = {s.casefold() for s in self.spellings(answer)}
        verb = self._verb_of.get(answer)
        slips = []
        if verb is not None:
            # A regularised irregular ("goed"), a missed doubling or y -> i ("stoped", "tryed"), the base form.
            slips = [regular_past(verb), verb] + ([] if verb.endswith("e") else [verb + "ed"])
        slips = [w for w in dict.fromkeys(slips) if w.casefold() not in right]
        if slips and rng.random() < 0.5:
            return rng.choice(slips)
        return rng.choice([forms[0] for forms in self.table.values() if forms[0].casefold() not in right])

    def check(self, prediction, row):
        cands = {c.casefold() for c in _word_candidates(final_line(prediction), 1)}
        return any(s.casefold() in cands for s in self.spellings(str(row["answer"])))


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        SortTask(), ReverseTask(), ReverseTask("reverse3", 3, 3), AddTask(), SuccessorTask(), FigletTask(),
        CapitalTask(), CapitalTask("world_capital", WORLD_CAPITALS), UppercaseTask(), PluralTask(),
        PastTenseTask(),
    )
}


def get_task(name: str) -> Task:
    """The registered task called ``name`` (a leading ``builtin:`` is accepted)."""
    key = name.strip()
    if key.startswith("builtin:"):
        key = key[len("builtin:"):]
    try:
        return TASKS[key]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


# --------------------------------------------------------------------------------------------
# Label noise
# --------------------------------------------------------------------------------------------


def _last_assistant(row: dict[str, Any]) -> int | None:
    msgs = row.get("messages") or []
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i].get("role") == "assistant":
            return i
    return None


def _get_response(row: dict[str, Any]) -> str | None:
    if "messages" in row and row["messages"] is not None:
        i = _last_assistant(row)
        return None if i is None else row["messages"][i]["content"]
    return row.get("response")


def _set_response(row: dict[str, Any], text: str) -> None:
    if "messages" in row and row["messages"] is not None:
        row["messages"][_last_assistant(row)]["content"] = text
    else:
        row["response"] = text


def noise(rows: list[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    """Corrupt the responses of exactly ``round(fraction * len(rows))`` rows, deterministically.

    Rows are chosen uniformly without replacement with a generator seeded by ``seed``. A chosen
    row of a known task (``row["task"]`` in :data:`TASKS`) gets ``task.respond(task.corrupt(answer))``
    (a plausible wrong answer), or, when it records an ``answer_span`` (a response in the model's own
    words, :mod:`bnll_lightning.self_targets`), that response with the span replaced by the wrong
    answer; any other row (e.g. from a file) gets the response of another
    row whose response differs (for ``messages`` rows, the last assistant turn is replaced).
    Every corrupted response differs from the original one.

    Returns new row dicts (inputs are not modified), each with ``noisy: bool``; ``answer`` (the
    truth) is kept as is. Raises ``ValueError`` if a chosen row cannot be corrupted (all responses
    identical).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"noise fraction must be in [0, 1], got {fraction}")
    out = [copy.deepcopy(row) for row in rows]
    for row in out:
        row["noisy"] = False
    n = len(out)
    k = round(fraction * n)
    if k == 0:
        return out
    rng = random.Random(f"bnll_lightning.tasks.noise:{int(seed)}")
    chosen = sorted(rng.sample(range(n), k))
    originals = [_get_response(row) for row in rows]
    for i in chosen:
        row = out[i]
        old = originals[i]
        if old is None:
            raise ValueError(f"row {i} has no response to corrupt")
        task = TASKS.get(row.get("task")) if isinstance(row.get("task"), str) else None
        new = None
        if task is not None and row.get("answer") is not None and "messages" not in row:
            span = row.get("answer_span")
            for _ in range(100):
                wrong = task.corrupt(str(row["answer"]), rng)
                # A self-phrased response (bnll_lightning.self_targets) keeps its phrasing: only its answer changes.
                new = old[: span[0]] + wrong + old[span[1]:] if span else task.respond(wrong)
                if new != old:
                    break
            else:
                new = None
        if new is None:
            donors = [j for j in range(n) if j != i and originals[j] is not None and originals[j] != old]
            if not donors:
                raise ValueError(f"cannot corrupt row {i}: every other row has the same response")
            new = originals[rng.choice(donors)]
        _set_response(row, new)
        row["noisy"] = True
    return out

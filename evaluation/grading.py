r"""Grade an agent's final answer against the gold answer.

Two grader families, both pure functions of (prediction, gold):

- ``math``: numeric rules that follow how the gold is written (below), then symbolic equivalence with
  math-verify for everything else (fractions, radicals, tuples, intervals, sets, equations), then a
  normalised string comparison when neither side can be parsed.
- ``qa``: SQuAD-style normalisation, exact match, token F1 and cover-EM (the normalised gold occurs
  in the normalised prediction as a whole-token span). ``correct`` is cover-EM; EM and F1 are recorded.

Numeric rules (method ``numeric``), used when the gold is a plain decimal number and the prediction a
plain number or a fraction. Thousands separators (``13,138,980``), a sign, currency (``\$``), unit words
(``42 apples``, ``5.4 \text{ cents}``, ``90^\circ``), scientific notation (``4.46752e-05``) and
``\boxed{}`` are read on both sides; a percent sign on either side also admits the value / 100
(``25%`` = ``0.25``). Float noise in the last digits of a value written with 15 or more significant
digits (``561161.7000000001``, ``3313620.6879999996``) is read as the short decimal it stands for.

- An integral gold (``13138980``, ``13138980.0``) needs exactly that integer: ``13138980``,
  ``13,138,980`` and ``1.313898e7`` are right; ``13138981``, ``13139000`` and ``13140000`` are wrong.
- A gold with a short exact decimal expansion, at most :data:`EXACT_MAX_DECIMALS` decimals
  (``963739.5``, ``18.90``), needs exactly that value: ``963739.5``, ``963739.50`` and ``1927479/2`` are
  right; ``963739`` and ``963740`` are wrong.
- A gold with more decimals is taken as a rounding of a repeating or irrational value: a float
  (``33.333333333333336``, ``66.66666666666667``) or a value rounded to 10 decimals (GSM-Hard's
  ``5031.9785714286``). It accepts a prediction with at least two decimals and two significant digits
  that equals the gold rounded to that many decimals (``33.33`` and ``33.333333`` for
  ``33.333333333333336``, ``66.67`` for ``66.66666666666667``, ``0.000045`` for ``4.46752e-05``;
  ``33.3``, ``33.34`` and ``33`` are wrong for the first, ``0.00`` for the last), or any prediction
  equal to the gold to the gold's own precision (``100/3``).

A gold written as an exact fraction or radical (``\frac{14}{3}``, ``\sqrt{2}/2``) is not a plain
number: math-verify matches it symbolically, so ``14/3`` is right and the rounding ``4.6667`` is wrong.
math-verify runs in a worker process under a real time limit (:mod:`evaluation.symbolic`); a
comparison that exceeds :data:`SYMBOLIC_TIMEOUT_S` is graded incorrect with method ``timeout``.

An optional :class:`LLMJudge` asks a model (any ``Generator``, e.g. the openai backend) whether a QA
prediction matches the gold, with a fixed prompt at temperature 0.

Every :class:`Grade` records the method that decided it and the normalised strings it compared, so a
surprising verdict can be audited from the predictions table. :data:`GRADER_VERSION` names the rules;
``distillery regrade`` re-scores a stored evaluation with the current ones.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Literal

from agent_runtime.generation import Generator, Request, Sampling
from agent_runtime.parsing import last_boxed
from evaluation.symbolic import Verdict, compare

Gold = str | list[str] | None

# Bump when a change can turn a verdict; evaluations record it and `distillery regrade` re-scores with it.
# 1: relative tolerance 1e-4 on every numeric gold. 2: numeric rules that follow the gold (above).
GRADER_VERSION = "2"
# Exact decimals of a gold seen as a value in itself; a gold with more is seen as a rounding. In GSM-Hard's
# 500 test golds the 61 non-integral exact ones have 1-4 decimals (11656320.9375), the 47 roundings 8-10.
EXACT_MAX_DECIMALS = 6
# A prediction rounding a repeating or irrational gold states at least this many decimals...
MIN_ROUNDED_DECIMALS = 2
# ...and this many significant digits (so "0.00" is no rounding of 4.46752e-05).
MIN_ROUNDED_SIGNIFICANT = 2
# Float arithmetic is off by a few units in the last place (0.1 + 0.2 = 0.30000000000000004).
FLOAT_NOISE_ULPS = 4
# Time limit of one symbolic comparison (parsing both sides and verifying), enforced by killing the worker.
SYMBOLIC_TIMEOUT_S = 5.0
# Inputs sympy is known to choke on are not sent at all (a killed worker costs a restart).
MAX_SYMPY_CHARS = 300
# Decimal exponents beyond this are not plain numbers ("1e100000000" would build a 100-million-digit int).
MAX_EXPONENT = 400


@dataclass(frozen=True)
class Grade:
    """The verdict on one prediction.

    ``score`` is 1.0 for correct and 0.0 otherwise (kept separate so a graded-credit grader can be added
    without changing the schema). ``excluded`` marks a question without a gold answer: it counts in
    neither the numerator nor the denominator of accuracy.
    """

    correct: bool
    score: float
    method: str
    pred_norm: str
    gold_norm: str
    em: float | None = None
    f1: float | None = None
    excluded: bool = False


def grade(
    prediction: str | None,
    gold: Gold,
    kind: Literal["math", "qa"],
    error: str | None = None,
) -> Grade:
    """Grade one episode's answer.

    A missing gold (None, empty string or empty alias list) gives an excluded grade. An episode that
    errored (``error`` set) or produced no answer is never correct, whatever its prediction says.
    ``gold`` may be a list of aliases (QA): any alias matching is enough.
    """
    golds = _gold_list(gold)
    pred_norm = _normalize(prediction, kind) if prediction else ""
    if not golds:
        return Grade(False, 0.0, "no_gold", pred_norm, "", excluded=True)
    if error is not None:
        return Grade(False, 0.0, "error", pred_norm, _normalize(golds[0], kind))
    if prediction is None or not prediction.strip():
        return Grade(False, 0.0, "no_answer", "", _normalize(golds[0], kind))
    if kind == "math":
        grades = [grade_math(prediction, g) for g in golds]
    else:
        grades = [grade_qa(prediction, g) for g in golds]
    # The best alias wins: correct first, then the higher F1 (for the recorded EM/F1 of QA).
    return max(grades, key=lambda g: (g.correct, g.f1 or 0.0))


def _gold_list(gold: Gold) -> list[str]:
    if gold is None:
        return []
    aliases = [gold] if isinstance(gold, str) else list(gold)
    return [a for a in aliases if a.strip()]


def _normalize(text: str, kind: Literal["math", "qa"]) -> str:
    return _strip_math(text) if kind == "math" else normalize_answer(text)


# --------------------------------------------------------------------------------------------- extraction


_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    r"""The final answer in a free-form (chain-of-thought) output.

    Tries, in order: the last ``\boxed{}``; the text after the last "answer is"/"answer:" up to the end
    of its sentence; the last number in the text. Returns None when none is present.
    """
    boxed = last_boxed(text)
    if boxed:
        return boxed
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        tail = matches[-1].group(1).splitlines()[0]
        # End of sentence is a period followed by space or end; a decimal point is followed by a digit.
        tail = re.split(r"\.(?=\s|$)", tail)[0]
        tail = tail.strip().strip("$").strip()
        if tail:
            return tail
    numbers = re.findall(rf"(?<![\w.])(?:{_NUMBER})", text)
    return numbers[-1].replace(",", "") if numbers else None


# ----------------------------------------------------------------------------------------------- math


def grade_math(pred: str, gold: str) -> Grade:
    """Grade a math answer: numeric rules for decimal golds, else math-verify, else string equality.

    ``pred`` may contain a ``\\boxed{}`` (its content is graded) or short prose ("x = 5", "42 apples").
    """
    p = _strip_math(pred)
    g = _strip_math(gold)
    gold_num = _parse_number(g, allow_fraction=False)
    if gold_num is not None:
        pred_num = _parse_number(p, allow_fraction=True)
        if pred_num is not None:
            ok = _numbers_match(pred_num, gold_num)
            return Grade(ok, float(ok), "numeric", p, g)
    if not (_too_complex_for_sympy(p) or _too_complex_for_sympy(g)):
        verdict = compare(p, g, SYMBOLIC_TIMEOUT_S)
        if verdict is Verdict.TIMEOUT:
            return Grade(False, 0.0, "timeout", p, g)
        if verdict is not Verdict.UNPARSED:
            ok = verdict is Verdict.EQUAL
            return Grade(ok, float(ok), "math_verify", p, g)
    ok = _latex_canonical(p) == _latex_canonical(g)
    return Grade(ok, float(ok), "string", p, g)


def _strip_math(text: str) -> str:
    """Boxed content if any, math delimiters and surrounding punctuation removed, whitespace collapsed."""
    text = text.strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right) and len(text) > len(left) + len(right):
            text = text[len(left) : -len(right)]
            break
    return " ".join(text.strip().rstrip(".").split())


# A plain number, optionally with currency before and percent / unit words after:
# "$1,234.50", "25%", "25\%", "4319 dollars", "5.4 \text{ cents}", "90^\circ", "-3.2e-05".
_PLAIN_NUMBER = re.compile(
    r"^(?P<sign>[-+]?)\s*(?:\\?\$)?\s*(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)"
    r"\s*(?P<pct>\\?%)?(?P<unit>(?:\s+[A-Za-z]+\.?){0,3})\s*$"
)
_FRACTION = re.compile(
    r"^(?P<sign>-?)\s*(?:\\[dt]?frac\{(?P<a>\d+)\}\{(?P<b>\d+)\}|(?P<c>\d+)\s*/\s*(?P<d>\d+))$"
)


@dataclass(frozen=True)
class _Number:
    """A number as written: its exact value and the precision it was written with."""

    value: Fraction
    decimals: int | None  # digits after the point, scientific notation resolved; None for a fraction
    significant: int  # significant digits written (0 for zero and for a fraction)
    percent: bool

    def per_cent(self) -> _Number:
        """The value / 100, written with two more decimals ("25%" -> 0.25)."""
        decimals = None if self.decimals is None else self.decimals + 2
        return _Number(self.value / 100, decimals, self.significant, False)


def _parse_number(text: str, allow_fraction: bool) -> _Number | None:
    """The number ``text`` is, if it is a plain number (or a fraction, when ``allow_fraction``)."""
    t = text.replace("−", "-").replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    t = re.sub(r"\\(?:text|textnormal|mbox|mathrm)\{([^{}]*)\}", r"\1", t)
    t = re.sub(r"\^\s*\{?\\circ\}?|°", "", t).strip()
    m = _PLAIN_NUMBER.match(t)
    if m:
        number = Decimal(m.group("num").replace(",", ""))
        if abs(number.as_tuple().exponent) > MAX_EXPONENT:
            return None
        if m.group("sign") == "-":
            number = -number
        return _denoised(_decimal_number(number, m.group("pct") is not None))
    m = _FRACTION.match(t) if allow_fraction else None
    if m:
        num, den = (m.group("a"), m.group("b")) if m.group("a") else (m.group("c"), m.group("d"))
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return _Number(-value if m.group("sign") else value, None, 0, False)
    return None


def _decimal_number(number: Decimal, percent: bool) -> _Number:
    _, digits, exponent = number.as_tuple()
    significant = len("".join(map(str, digits)).lstrip("0"))
    return _Number(Fraction(number), max(0, -exponent), significant, percent)


def _denoised(number: _Number) -> _Number:
    """A value written with 15+ significant digits, read as the shortest decimal within float noise of it.

    Only such values can be float output, and only in them does noise show: 561161.7000000001 is
    561161.7, 852828.6363636367 stays a rounding of a repeating value (852828.636363637, 15 digits).
    """
    noise = _float_noise(number.value)
    if number.significant < 15 or number.decimals == 0 or not noise:
        return number
    as_float = float(number.value)
    for digits in range(1, 18):
        shorter = Decimal(f"{as_float:.{digits - 1}e}")
        if abs(Fraction(shorter) - number.value) <= noise:
            return _decimal_number(shorter, number.percent)
    return number


def _numbers_match(pred: _Number, gold: _Number) -> bool:
    """The numeric rules of the module docstring; a percent on either side also admits the value / 100."""
    preds = [pred, pred.per_cent()] if pred.percent else [pred]
    golds = [gold, gold.per_cent()] if gold.percent else [gold]
    return any(_value_matches(p, g) for p in preds for g in golds)


def _value_matches(pred: _Number, gold: _Number) -> bool:
    if _exact_decimals(gold.value) <= EXACT_MAX_DECIMALS:
        return pred.value == gold.value  # an integer or a short exact decimal: nothing else is right
    decimals = gold.decimals
    if (pred.decimals is not None and pred.decimals >= MIN_ROUNDED_DECIMALS
            and pred.significant >= MIN_ROUNDED_SIGNIFICANT):
        decimals = min(decimals, pred.decimals)  # a rounding to the prediction's own decimals
    # Half a unit in the last decimal kept is what "equals the gold rounded to that many decimals" allows;
    # the float noise term lets 100/3 equal 33.333333333333336, which is 2.7e-15 away.
    tolerance = max(Fraction(1, 2 * 10**decimals), _float_noise(gold.value))
    return abs(pred.value - gold.value) <= tolerance


def _float_noise(value: Fraction) -> Fraction:
    """How far float arithmetic may put a result from ``value``; 0 beyond the float range."""
    try:
        return FLOAT_NOISE_ULPS * Fraction(math.ulp(float(value)))
    except OverflowError:  # a 400-digit answer is no float output
        return Fraction(0)


def _exact_decimals(value: Fraction) -> int:
    """How many decimals it takes to write ``value`` exactly (values here always have a finite expansion)."""
    decimals = 0
    while (value * 10**decimals).denominator != 1:
        decimals += 1
    return decimals


def _too_complex_for_sympy(text: str) -> bool:
    """True for inputs that can make sympy evaluate for minutes (huge powers, factorials, long text)."""
    if len(text) > MAX_SYMPY_CHARS:
        return True
    if re.search(r"(\^|\*\*)\s*\{?\s*\(?\s*-?\d{4,}", text):  # 9^{387420489}: exact big integer
        return True
    if re.search(r"\^\s*\{[^{}]*\^|\^\s*\d+\s*\^|\*\*\s*\(?\s*\d+\s*\)?\s*\*\*", text):
        return True  # power towers: 9^{9^{9}}, 9^9^9, 9**9**9
    return bool(re.search(r"\d{4,}\s*!", text))  # 100000! is evaluated exactly


def _latex_canonical(text: str) -> str:
    """Last-resort comparison form: no spacing/sizing commands, \\text wrappers or case differences."""
    t = re.sub(r"\\(?:left|right|displaystyle|!|,|;|quad)", "", text)
    t = re.sub(r"\\(?:text|textbf|textnormal|mathrm|mbox)\{([^{}]*)\}", r"\1", t)
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"[\s{}()]", "", t).lower()


# ------------------------------------------------------------------------------------------------- QA


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace.

    Punctuation is every Unicode punctuation character (SQuAD uses ASCII only), so typographic quotes and
    dashes in Wikipedia-derived golds ("Rick’s", "1899–1901") normalise like their ASCII forms.
    """
    text = text.lower()
    text = "".join(
        ch for ch in text if ch not in string.punctuation and not unicodedata.category(ch).startswith("P")
    )
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(pred_norm: str, gold_norm: str) -> float:
    """Token-level F1 between normalised strings (HotpotQA rule: yes/no/noanswer must match exactly)."""
    special = {"yes", "no", "noanswer"}
    if (pred_norm in special or gold_norm in special) and pred_norm != gold_norm:
        return 0.0
    pred_tokens, gold_tokens = pred_norm.split(), gold_norm.split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def cover_em(pred_norm: str, gold_norm: str) -> bool:
    """The gold occurs in the prediction as a whole-token span ("paris" in "paris france", not in "parish")."""
    return bool(gold_norm) and f" {gold_norm} " in f" {pred_norm} "


def grade_qa(pred: str, gold: str) -> Grade:
    """Grade a factual answer: ``correct`` is cover-EM; EM and F1 are recorded alongside.

    Why cover-EM: the paper reports LLM-judge accuracy, which accepts a correct answer phrased at more
    length ("Paris, France" for "Paris"); EM would count those wrong. Offline, without a judge, cover-EM is
    the closest proxy. For yes/no golds, containment would reward hedging ("yes or no"), so the
    prediction must contain the gold word and not its opposite.
    """
    p, g = normalize_answer(pred), normalize_answer(gold)
    em = float(p == g)
    f1 = token_f1(p, g)
    if g in ("yes", "no"):
        opposite = "no" if g == "yes" else "yes"
        tokens = p.split()
        ok = g in tokens and opposite not in tokens
        return Grade(ok, float(ok), "yes_no", p, g, em=em, f1=f1)
    ok = cover_em(p, g)
    return Grade(ok, float(ok), "cover_em", p, g, em=em, f1=f1)


# ---------------------------------------------------------------------------------------------- judge

JUDGE_PROMPT = """You are grading an answer to a question. Decide whether the predicted answer means the \
same as the gold answer. Ignore differences in wording, capitalisation, punctuation and extra detail \
that does not contradict the gold answer.

Question: {question}
Gold answer: {gold}
Predicted answer: {prediction}

Is the predicted answer correct? Reply with one word: yes or no."""


@dataclass(frozen=True)
class JudgeItem:
    """One (question, prediction, gold) triple for :meth:`LLMJudge.judge_batch`."""

    question: str
    prediction: str | None
    gold: Gold
    error: str | None = None


class LLMJudge:
    """Grades QA answers by asking a model "is this correct?" (fixed prompt, temperature 0).

    The same exclusion rules as :func:`grade` apply before the model is asked: missing gold -> excluded,
    error or empty prediction -> incorrect. EM and F1 are recorded from the offline QA grader.
    """

    def __init__(self, generator: Generator, model_name: str, max_new_tokens: int = 8) -> None:
        self.generator = generator
        self.model_name = model_name
        self.sampling = Sampling(n=1, temperature=0.0, max_new_tokens=max_new_tokens)

    def judge(self, question: str, prediction: str | None, gold: Gold, error: str | None = None) -> Grade:
        """Judge one answer (one backend call)."""
        return self.judge_batch([JudgeItem(question, prediction, gold, error)])[0]

    def judge_batch(self, items: list[JudgeItem]) -> list[Grade]:
        """Judge many answers with a single batched backend call; grades come back in input order."""
        offline = [grade(it.prediction, it.gold, "qa", error=it.error) for it in items]
        to_ask = [i for i, g in enumerate(offline) if g.method not in ("no_gold", "error", "no_answer")]
        requests = [Request(messages=[{"role": "user", "content": self._prompt(items[i])}]) for i in to_ask]
        generations = self.generator.generate(requests, self.sampling) if requests else []
        grades = list(offline)
        for i, generation in zip(to_ask, generations, strict=True):
            verdict = _parse_yes_no(generation.completions[0].text)
            method = (
                f"llm_judge:{self.model_name}"
                if verdict is not None
                else f"llm_judge_unparsed:{self.model_name}"
            )
            ok = bool(verdict)
            base = offline[i]
            grades[i] = Grade(ok, float(ok), method, base.pred_norm, base.gold_norm, em=base.em, f1=base.f1)
        return grades

    @staticmethod
    def _prompt(item: JudgeItem) -> str:
        golds = _gold_list(item.gold)
        gold_text = golds[0] if len(golds) == 1 else " / ".join(golds)
        return JUDGE_PROMPT.format(question=item.question, gold=gold_text, prediction=item.prediction)


def _parse_yes_no(text: str) -> bool | None:
    """True for a reply starting with "yes", False for "no", None for anything else."""
    words = re.findall(r"[a-z]+", text.lower())
    if not words or words[0] not in ("yes", "no"):
        return None
    return words[0] == "yes"

"""Grade an agent's final answer against the gold answer.

Two grader families, both pure functions of (prediction, gold):

- ``math``: a numeric rule for GSM-style decimal golds (relative tolerance 1e-4, thousands separators,
  percent, currency and unit words tolerated), then symbolic equivalence with math-verify for
  everything else (fractions, radicals, tuples, intervals, sets, equations), then a normalised string
  comparison when neither side can be parsed.
- ``qa``: SQuAD-style normalisation, exact match, token F1 and cover-EM (the normalised gold occurs
  in the normalised prediction as a whole-token span). ``correct`` is cover-EM; EM and F1 are recorded.

An optional :class:`LLMJudge` asks a model (any ``Generator``, e.g. the openai backend) whether a QA
prediction matches the gold, with a fixed prompt at temperature 0.

Every :class:`Grade` records the method that decided it and the normalised strings it compared, so a
surprising verdict can be audited from the predictions table.
"""

from __future__ import annotations

import re
import string
import threading
import unicodedata
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from agent_runtime.generation import Generator, Request, Sampling

Gold = str | list[str] | None

# GSM-Hard golds are floats computed by a program (3.3333333, 561161.7000000001): a relative
# tolerance accepts a correctly rounded answer without accepting a different one.
NUMERIC_REL_TOL = 1e-4
# Absolute floor for golds that are exactly zero, where a relative tolerance accepts nothing.
NUMERIC_ABS_TOL = 1e-9
# math-verify's own timeouts rely on SIGALRM, which only works in the main thread (Prefect runs tasks in
# worker threads). Off the main thread we disable them and rely on _too_complex_for_sympy instead.
MATH_VERIFY_TIMEOUT_S = 3
MAX_SYMPY_CHARS = 300


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


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, braces balanced."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        loose = re.findall(r"\\boxed\s+([^\s$]+)", text)  # "\boxed 5" (no braces) is valid LaTeX
        return loose[-1] if loose else None
    begin = starts[-1].end()
    depth = 1
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
    return None  # unbalanced: the output was cut off inside the box


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
    """Grade a math answer: numeric rule for decimal golds, else math-verify, else string equality.

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
        verdict = _math_verify(p, g)
        if verdict is not None:
            return Grade(verdict, float(verdict), "math_verify", p, g)
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
    value: float
    percent: bool


def _parse_number(text: str, allow_fraction: bool) -> _Number | None:
    """A numeric value if ``text`` is a plain number (fractions only when ``allow_fraction``)."""
    t = text.replace("−", "-").replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    t = re.sub(r"\\(?:text|textnormal|mbox|mathrm)\{([^{}]*)\}", r"\1", t)
    t = re.sub(r"\^\s*\{?\\circ\}?|°", "", t).strip()
    m = _PLAIN_NUMBER.match(t)
    if m:
        value = float(m.group("num").replace(",", ""))
        return _Number(-value if m.group("sign") == "-" else value, m.group("pct") is not None)
    m = _FRACTION.match(t) if allow_fraction else None
    if m:
        num, den = (m.group("a"), m.group("b")) if m.group("a") else (m.group("c"), m.group("d"))
        if int(den) == 0:
            return None
        value = float(Fraction(int(num), int(den)))
        return _Number(-value if m.group("sign") else value, False)
    return None


def _numbers_match(pred: _Number, gold: _Number) -> bool:
    # "25%" and "0.25" are the same answer; a percent on either side also admits the value / 100.
    preds = {pred.value, pred.value / 100} if pred.percent else {pred.value}
    golds = {gold.value, gold.value / 100} if gold.percent else {gold.value}
    for p in preds:
        for g in golds:
            if abs(p - g) <= max(NUMERIC_REL_TOL * abs(g), NUMERIC_ABS_TOL):
                return True
    return False


def _too_complex_for_sympy(text: str) -> bool:
    """True for inputs that can make sympy evaluate for minutes (huge powers, factorials, long text)."""
    if len(text) > MAX_SYMPY_CHARS:
        return True
    if re.search(r"(\^|\*\*)\s*\{?\s*\(?\s*-?\d{4,}", text):  # 9^{387420489}: exact big integer
        return True
    if re.search(r"\^\s*\{[^{}]*\^|\^\s*\d+\s*\^|\*\*\s*\(?\s*\d+\s*\)?\s*\*\*", text):
        return True  # power towers: 9^{9^{9}}, 9^9^9, 9**9**9
    return bool(re.search(r"\d{4,}\s*!", text))  # 100000! is evaluated exactly


# Words that occur in math answers; any other word of 3+ letters means the answer is prose.
_MATH_WORDS = {
    "sqrt",
    "frac",
    "dfrac",
    "tfrac",
    "pi",
    "infty",
    "inf",
    "sin",
    "cos",
    "tan",
    "log",
    "ln",
    "exp",
    "cup",
    "cap",
    "left",
    "right",
    "cdot",
    "times",
    "circ",
    "text",
    "and",
    "or",
    "mbox",
}


def _looks_like_prose(text: str) -> bool:
    """True when ``text`` has a lowercase word of 3+ letters outside LaTeX commands and known functions.

    Commands with a word argument (``\\begin{pmatrix}``, ``\\text{ feet}``) are LaTeX; capitalised runs
    like ``ABC`` name points in geometry answers.
    """
    bare = re.sub(r"\\[A-Za-z]+(?:\{[A-Za-z* ]*\})?", " ", text)
    words = re.findall(r"\b[A-Za-z]*[a-z][A-Za-z]*\b", bare)
    return any(len(w) >= 3 and w.lower() not in _MATH_WORDS for w in words)


def _plain_to_latex(text: str) -> str:
    """Spell plain-text math the way the LaTeX parser expects ("pi" -> "\\pi", "oo" -> "\\infty")."""
    text = re.sub(r"(?<!\\)\bpi\b", r"\\pi", text)
    text = re.sub(r"(?<!\\)\b(?:oo|inf|infinity)\b", r"\\infty", text)
    return re.sub(r"\s+U\s+", r" \\cup ", text)


def _math_verify(pred: str, gold: str) -> bool | None:
    """math-verify's verdict, or None when either side does not parse to a math object."""
    from math_verify import parse, verify  # heavy import (sympy, antlr) kept off module import

    in_main = threading.current_thread() is threading.main_thread()
    timeout = MATH_VERIFY_TIMEOUT_S if in_main else None
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    if not gold_parsed:
        return None
    if _looks_like_prose(pred):
        # Prose ("the total is 42 apples") must not be read as LaTeX products of letters.
        pred_parsed = parse(pred, parsing_timeout=timeout)
    else:
        pred_parsed = parse(f"${_plain_to_latex(pred)}$", parsing_timeout=timeout) or parse(
            pred, parsing_timeout=timeout
        )
    if not pred_parsed:
        return None
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


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

"""The CodeAct conversation format: system prompts, the user turns, and the canonical assistant action.

An episode is the chat ``system, user(task), assistant(action), user(observation), assistant(action), ...``.
Every assistant action reads::

    Thought: <reasoning>
    Code:
    ```py
    <python>
    ```<end_code>

and generation stops at ``<end_code>`` (or at a hallucinated ``Observation:``). The code's prints come back
as the user turn ``Observation:\\n<prints>``; calling ``final_answer(x)`` ends the episode. Teachers get the
full system prompt (tools, rules, worked examples); students the short one, which is also the prompt the
distilled trajectories are trained with.
"""

from __future__ import annotations

from typing import Literal

END_CODE = "<end_code>"
# "Observation:" is a stop too: small models often go on to invent the observation themselves.
STOP_SEQUENCES: tuple[str, ...] = (END_CODE, "Observation:")

_FORMAT = f"""Thought: <your reasoning about what to do next>
Code:
```py
<python code>
```{END_CODE}"""

_TOOLS = """- web_search(query: str) -> str: searches a Wikipedia corpus and returns the most relevant passages
  as text. Print its result to read it. Use short, specific queries, one fact at a time.
- final_answer(answer) -> None: gives the final answer to the task and ends it. The answer should be
  short: a number, a name, a date or a few words, without explanation."""

_EXAMPLES = f"""Task: What is the sum of the squares of the first 20 positive integers?

Thought: I will compute the sum directly in Python and print it.
Code:
```py
total = sum(k ** 2 for k in range(1, 21))
print(total)
```{END_CODE}
Observation:
2870

Thought: The sum is 2870, which matches n(n+1)(2n+1)/6 = 20*21*41/6. I can give the answer.
Code:
```py
final_answer(2870)
```{END_CODE}

---
Task: In which present-day country was the composer of the opera "The Magic Flute" born?

Thought: First I need the composer of "The Magic Flute". I will search for it.
Code:
```py
print(web_search("The Magic Flute opera composer"))
```{END_CODE}
Observation:
"The Magic Flute" The Magic Flute is an opera in two acts by Wolfgang Amadeus Mozart to a German
libretto by Emanuel Schikaneder. It premiered in Vienna in 1791.

Thought: The composer is Wolfgang Amadeus Mozart. Now I need his birthplace.
Code:
```py
print(web_search("Wolfgang Amadeus Mozart birthplace"))
```{END_CODE}
Observation:
"Wolfgang Amadeus Mozart" Wolfgang Amadeus Mozart (1756-1791) was a composer of the Classical period,
born in Salzburg, then capital of the Archbishopric of Salzburg, today a city in Austria.

Thought: Mozart was born in Salzburg, which is in present-day Austria.
Code:
```py
final_answer("Austria")
```{END_CODE}

---
Task: A train travels 150 km in 1.5 hours and then 200 km in 2 hours. What is its average speed in km/h?

Thought: Average speed is total distance over total time. I will compute it.
Code:
```py
speed = statistics.fmean([150, 200]) / statistics.fmean([1.5, 2])
print(speed)
```{END_CODE}
Observation:
Error: NameError: name 'statistics' is not defined

Thought: I forgot the import, and a mean of ratios is not needed anyway: divide the totals.
Code:
```py
distance_km = 150 + 200
time_h = 1.5 + 2
print(distance_km / time_h)
```{END_CODE}
Observation:
100.0

Thought: The average speed is 100 km/h.
Code:
```py
final_answer(100)
```{END_CODE}"""

TEACHER_SYSTEM_PROMPT = f"""You are an expert assistant who solves tasks by writing Python code. You can use tools.
You work in a cycle of 'Thought:', 'Code:' and 'Observation:' steps until the task is solved.

At each step, first write 'Thought:' with your reasoning and the tool or computation you will use next.
Then write 'Code:' followed by one Python block that starts with ```py and ends with ```{END_CODE}:

{_FORMAT}

The code is run and everything it prints is shown to you in the next 'Observation:' turn, so print the
values you need. Variables and imports persist between steps. When you know the answer, call
final_answer(answer) in your code; this ends the task.

Tools, callable as Python functions:
{_TOOLS}

Rules:
1. Always write 'Thought:' then 'Code:' with a ```py block ending with ```{END_CODE}; nothing else.
2. Never write an 'Observation:' yourself; it is provided after your code runs.
3. Use only variables you have defined. Call tools with plain arguments, not with dictionaries.
4. Look facts up with web_search instead of guessing; compute with Python instead of by hand.
5. You may import: collections, datetime, itertools, math, random, re, statistics, time,
   unicodedata, fractions, decimal, numpy, sympy.
6. If a step fails, read the error in the observation and fix your code in the next step.

Here are examples of solved tasks:

{_EXAMPLES}

Now solve the task you are given. Solve it completely yourself, step by step."""

STUDENT_SYSTEM_PROMPT = f"""You solve tasks by writing Python code, in cycles of 'Thought:', 'Code:' and 'Observation:'.
Write 'Thought:' with your reasoning, then 'Code:' and one ```py block ending with ```{END_CODE}.
What the code prints is returned as 'Observation:'. Variables persist between steps.
Tools: web_search(query: str) -> str searches Wikipedia and returns passages;
final_answer(answer) gives the final answer and ends the task."""

COT_SYSTEM_PROMPT = """Solve the problem step by step. Write each step as its own short paragraph and separate
the paragraphs with a blank line. End with the sentence: The final answer is \\boxed{ANSWER}."""


def system_prompt(kind: Literal["teacher", "student"]) -> str:
    """The system prompt for a teacher (tools, rules, few-shot examples) or a student (short, no examples)."""
    if kind == "teacher":
        return TEACHER_SYSTEM_PROMPT
    if kind == "student":
        return STUDENT_SYSTEM_PROMPT
    raise ValueError(f"unknown prompt kind {kind!r}; expected 'teacher' or 'student'")


def question_message(question: str) -> dict[str, str]:
    """The first user turn: the task."""
    return {"role": "user", "content": f"Task: {question.strip()}"}


def observation_message(observation: str) -> dict[str, str]:
    """The user turn that feeds an action's output (or its error text) back to the model."""
    return {"role": "user", "content": f"Observation:\n{observation}"}


def finalize_message() -> dict[str, str]:
    """The extra user turn after the last allowed step: answer now, through final_answer."""
    return {
        "role": "user",
        "content": (
            "You have reached the maximum number of steps. Do not search or compute any more: write a "
            "Thought and then code that calls final_answer(answer) with your best answer."
        ),
    }


def format_action(thought: str, code: str) -> str:
    """The canonical assistant text of one step; ``parse_action`` inverts it exactly."""
    return f"Thought: {thought.strip()}\nCode:\n```py\n{code.strip(chr(10)).rstrip()}\n```{END_CODE}"


def thought_prefix(first_step: str) -> str:
    """The assistant prefix that forces a CoT first step as the start of the first thought (FTP)."""
    return f"Thought: {first_step.strip()}"

"""Instruction-free prompts: nothing but examples in one plain format.

ISARA's point is that the model needs no instruction, system prompt or domain
description: retrieved examples of the domain are enough to make it continue
with a new one. A prompt here is demo text and two markers, nothing else
(tests check this). The format:

    Question: <demo question>
    Answer: <demo answer>

    Question: <demo question>
    Answer: <demo answer>

    Question:

Stage 1 shows demo questions only (or whole pairs, `generation.question_demos =
"random_pairs"`) and lets the model write the next question;
stage 2 shows demo pairs, then the new question, and lets it write the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Format:
    question_marker: str = "Question:"
    answer_marker: str = "Answer:"

    def question_prompt(self, demo_questions: list[str]) -> str:
        blocks = [f"{self.question_marker} {q}" for q in demo_questions]
        return BLOCK_SEPARATOR.join(blocks + [self.question_marker])

    def question_prompt_from_pairs(self, demo_pairs: list[tuple[str, str]]) -> str:
        """Whole pairs, then a new question's marker (the paper's stage 1): the model sees answers too."""
        blocks = [f"{self.question_marker} {q}\n{self.answer_marker} {a}" for q, a in demo_pairs]
        return BLOCK_SEPARATOR.join(blocks + [self.question_marker])

    def question_stops(self) -> list[str]:
        # A question ends at a blank line or at the next marker.
        return [BLOCK_SEPARATOR, f"\n{self.question_marker}", f"\n{self.answer_marker}"]

    def answer_prompt(self, demo_pairs: list[tuple[str, str]], question: str) -> str:
        blocks = [f"{self.question_marker} {q}\n{self.answer_marker} {a}" for q, a in demo_pairs]
        return BLOCK_SEPARATOR.join(blocks + [f"{self.question_marker} {question}\n{self.answer_marker}"])

    def answer_stops(self) -> list[str]:
        # Answers may hold blank lines (lists, paragraphs): they end at the next question.
        return [f"\n{self.question_marker}", f"{BLOCK_SEPARATOR}{self.question_marker.split(':')[0]}"]

    def parse_question(self, text: str) -> str | None:
        """The generated question, or None when the output is not one (empty, or markers inside)."""
        q = text.strip()
        if not q or self.answer_marker in q or self.question_marker in q:
            return None
        return q

    def parse_answer(self, text: str) -> str | None:
        a = text.strip()
        if not a or self.question_marker in a or f"\n{self.answer_marker}" in a:
            return None
        return a

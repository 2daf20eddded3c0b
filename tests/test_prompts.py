"""Generation prompts hold nothing but demo text and the format markers."""

from __future__ import annotations

from loop.generation.prompts import Format

DEMOS = [("How often should I water tomatoes?", "Two or three times a week."),
         ("When do I plant garlic?", "In autumn.")]


def _strip(prompt: str, pieces: list[str]) -> str:
    for p in sorted(pieces, key=len, reverse=True):
        prompt = prompt.replace(p, "")
    return prompt.strip()


def test_question_prompt_is_only_demo_questions_and_markers():
    fmt = Format()
    prompt = fmt.question_prompt([q for q, _ in DEMOS])
    assert _strip(prompt, [q for q, _ in DEMOS] + ["Question:"]) == ""
    assert prompt.endswith("Question:")


def test_the_papers_question_prompt_is_only_demo_pairs_and_markers_ending_at_a_new_question():
    fmt = Format()
    prompt = fmt.question_prompt_from_pairs(DEMOS)
    assert _strip(prompt, [t for pair in DEMOS for t in pair] + ["Question:", "Answer:"]) == ""
    assert prompt.endswith("\n\nQuestion:") and prompt.count("Answer:") == len(DEMOS)


def test_answer_prompt_is_only_demo_pairs_the_new_question_and_markers():
    fmt = Format()
    new = "How deep should I plant potatoes?"
    prompt = fmt.answer_prompt(DEMOS, new)
    assert _strip(prompt, [t for pair in DEMOS for t in pair] + [new, "Question:", "Answer:"]) == ""
    assert prompt.endswith(f"Question: {new}\nAnswer:")


def test_custom_markers_are_used_everywhere():
    fmt = Format("Q:", "A:")
    assert fmt.answer_prompt(DEMOS[:1], "x").count("Q:") == 2
    assert "\nQ:" in fmt.question_stops() and "\nQ:" in fmt.answer_stops()


def test_parsing_rejects_outputs_that_carry_markers():
    fmt = Format()
    assert fmt.parse_question("  How do I start seeds?  ") == "How do I start seeds?"
    assert fmt.parse_question("How?\nAnswer: like this") is None
    assert fmt.parse_question("   ") is None
    assert fmt.parse_answer("Water them.\nQuestion: next") is None

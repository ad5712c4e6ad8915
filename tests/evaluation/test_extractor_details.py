"""Extractor behaviour that ``make mutate`` showed untested (issue 21): the paper rules of
custom tasks, the families ``make_extractor`` builds, case handling of keywords.

Outputs are realistic model answers; expectations follow the extractors' documented rules.
"""

from __future__ import annotations

import pytest

from kdlab.evaluation.extractors import (
    KEYWORD_SETS,
    KeywordExtractor,
    LetterExtractor,
    NumericExtractor,
    PaperFirstMatchExtractor,
    PaperLastNumberExtractor,
    make_extractor,
    paper_rule_for,
)


def test_paper_rules_of_custom_extractors() -> None:
    numeric = paper_rule_for(make_extractor("numeric"))
    assert isinstance(numeric, PaperLastNumberExtractor)
    # the paper's last-number rule reads the continuation's number, kdlab's the stated one
    text = "The answer is 8.\n\nQuestion: Tom has 5 apples and eats 2. He has 3."
    assert make_extractor("numeric").extract(text) == "8" and numeric.extract(text) == "3."
    letter = paper_rule_for(make_extractor("letter", ["a", "b", "c"]))
    assert isinstance(letter, PaperFirstMatchExtractor) and letter.options == ("A", "B", "C")
    # first match, case-sensitive, no word boundary: the "A" of "Answer" counts
    assert letter.extract("Answer: (C)") == "A"
    keyword = paper_rule_for(KeywordExtractor(("True", "False")))
    assert isinstance(keyword, PaperFirstMatchExtractor)
    assert keyword.options == ("true", "false")
    assert keyword.extract("the answer is false") == "false"
    assert keyword.extract("The answer is FALSE") is None  # the paper's rule is case-sensitive
    answers = paper_rule_for(make_extractor("answer"))
    assert answers.extract("the correct answer is answer10") == "answer1"  # the paper's quirk
    assert paper_rule_for(object()) is None


def test_paper_first_match_needs_options_and_compares_exactly() -> None:
    with pytest.raises(ValueError, match=r"^PaperFirstMatchExtractor needs at least one option$"):
        PaperFirstMatchExtractor(())
    rule = PaperFirstMatchExtractor(("solution1", "solution2"))
    assert rule.extract("  solution2 is right, not solution1") == "solution2"
    assert rule.extract("no option here") is None and rule.extract(None) is None
    assert rule.is_correct("solution2", "solution2")
    assert not rule.is_correct("Solution2", "solution2") and not rule.is_correct(None, "x")


def test_paper_last_number_rule() -> None:
    rule = PaperLastNumberExtractor()
    assert rule.extract("It costs 1,234 dollars, then -5.5") == "-5.5"
    assert rule.extract("no number") is None and rule.extract(None) is None
    assert rule.is_correct("12.0004", "12") and not rule.is_correct("12.01", "12")
    assert not rule.is_correct(None, "12") and not rule.is_correct("1e999", "12")


def test_make_extractor_builds_each_family_with_its_choices() -> None:
    assert make_extractor("letter").letters == "ABCDE"
    assert make_extractor("aqua", ["a", "b", "c"]).letters == "ABC"
    assert make_extractor("Multiple_Choice", ["A", "B"]).letters == "AB"
    assert make_extractor("answer", ["answer1", "answer2"]).keywords == ("answer1", "answer2")
    assert make_extractor("hellaswag").keywords == KEYWORD_SETS["ending"]
    assert make_extractor("WINOGRANDE").keywords == KEYWORD_SETS["option"]
    commonsense = make_extractor("commonsense", ["Yes", "No"])
    assert isinstance(commonsense, KeywordExtractor) and commonsense.keywords == ("yes", "no")
    assert commonsense.extract("I think the answer is NO.") == "no"
    assert isinstance(make_extractor("Math"), NumericExtractor)
    with pytest.raises(ValueError, match="extractor type 'commonsense' needs a list of choices"):
        make_extractor("commonsense")
    # echoed option lists are recognised in the order of the task's own letters
    abc = make_extractor("letter", ["a", "b", "c"])
    assert abc.extract("A) 10\nB) 20\nC) 30") is None
    assert abc.extract("So the correct one is C)") == "C"


def test_keywords_are_matched_whatever_their_case() -> None:
    extractor = KeywordExtractor(("TRUE", "False"))
    assert extractor.keywords == ("true", "false")
    # the explicit statement wins over an earlier mention, in any case
    assert extractor.extract("true or false? The answer is FALSE.") == "false"
    assert extractor.extract("Answer: True") == "true"
    assert extractor.extract("It is TRUE that ...") == "true"
    assert extractor.extract("untrue/false") is None  # no keyword stands alone
    assert extractor.extract("") is None and extractor.extract(None) is None
    assert extractor.is_correct(" True ", "true") and not extractor.is_correct(None, "true")


def test_letters_stated_in_lower_case() -> None:
    extractor = LetterExtractor()
    assert extractor.extract("so the answer is c ) 130") == "C"
    assert extractor.extract("The answer is a number we compute: (B)") == "B"
    assert extractor.is_correct("(c)", "C") and not extractor.is_correct(None, "C")

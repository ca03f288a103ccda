"""Unit tests of kvbound.eval.metrics: answer extraction and scoring edge cases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbound.eval import metrics as m


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{5}.", "5"),
        (r"first \boxed{1} then \boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{{a}{b}}", "{a}{b}"),
        (r"The answer is \boxed 7.", "7"),
        (r"\fbox{12}", "12"),
        (r"\boxed{3} and a broken \boxed{4", "3"),
        ("no box here", None),
        (r"\boxed{unclosed", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert m.last_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 * 12 = 36\n36 - 7 = 29\n#### 29", "29"),
        ("#### 1,234", "1,234"),
        ("#### $12,000.", "12,000"),
        ("So the answer is 42.", "42"),
        ("The final answer: -3.5 and then 10 more words 7", "-3.5"),
        ("She had 5, then 8, so 13 apples remain", "13"),
        (r"We get 10, so \boxed{12}. Later 99.", "12"),
        ("no numbers at all", None),
        ("the answer is .5", ".5"),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert m.extract_answer(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$1,000.00", "1000"),
        ("3.50", "3.5"),
        ("-0.0", "0"),
        ("+7", "7"),
        ("007", "7"),
        (".5", "0.5"),
        ("12,34", None),  # not a thousands grouping
        ("1/2", "1/2"),
        ("50%", "50"),
        ("abc", None),
        ("42.", "42"),
    ],
)
def test_normalize_number(raw: str, expected: str | None) -> None:
    assert m.normalize_number(raw) == expected


def test_numeric_equal() -> None:
    assert m.numeric_equal("12,000", "12000")
    assert m.numeric_equal("7.50", "7.5")
    assert m.numeric_equal("1/2", "0.5")
    assert not m.numeric_equal("7", "7.01")
    assert not m.numeric_equal(None, "7")
    assert not m.numeric_equal("seven", "7")


# --------------------------------------------------------------------------------------------
# MATH equivalence
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac12", "1/2"),
        (r"\tfrac{3}{4}", "0.75"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (r"120^\circ", "120"),
        (r"120^{\circ}", "120°"),
        (r"\text{Evelyn}", "Evelyn"),
        (r"\textbf{(C)}", "(C)"),
        ("x = 5", "5"),
        ("1,000", "1000"),
        ("-2, 1", "1,-2"),
        (r"2\sqrt2", r"2\sqrt{2}"),
        (r"10\%", "10"),
        (r"\$5.00", "5"),
        (r"\boxed{7}", "7"),
        (r"\frac{\sqrt3}{2}", r"\frac{\sqrt{3}}{2}"),
        ("3\\!000", "3000"),
    ],
)
def test_math_equal_true(pred: str, gold: str) -> None:
    assert m.math_equal(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("(1,2)", "(2,1)"),  # tuples are ordered
        ("[1,2)", "[1,2]"),  # interval ends differ
        (r"\frac{1}{3}", "0.33"),
        ("5", "-5"),
        ("", "5"),
        (None, "5"),
        (r"\sqrt{8}", r"2\sqrt{2}"),  # symbolic equivalence is out of scope
    ],
)
def test_math_equal_false(pred: str | None, gold: str) -> None:
    assert not m.math_equal(pred, gold)


# --------------------------------------------------------------------------------------------
# string matching
# --------------------------------------------------------------------------------------------
def test_exact_and_substring_match() -> None:
    assert m.exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert m.exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert m.exact_match(" x ", "x", normalize=False) == 1.0
    assert m.substring_match("It is in Paris, France.", ["paris"]) == 1.0
    # whole-word match after normalisation: "art" is not in "party"
    assert m.substring_match("a party", "art") == 0.0
    assert m.substring_match("a party", "art", normalize=False) == 1.0
    assert m.substring_match("anything", []) == 0.0


def test_ruler_string_match() -> None:
    refs = ["QPE", "XKU", "RZY"]
    assert m.string_match_all("qpe and xku", refs) == pytest.approx(2 / 3)
    assert m.string_match_all("QPE XKU RZY", refs) == 1.0
    assert m.string_match_part("only rzy", refs) == 1.0
    assert m.string_match_part("none", refs) == 0.0
    assert m.string_match_all("", refs) == 0.0
    assert m.string_match_all("x", []) == 0.0


# --------------------------------------------------------------------------------------------
# F1 / ROUGE
# --------------------------------------------------------------------------------------------
def test_normalize_answer() -> None:
    assert m.normalize_answer("The  Cat, sat on A mat!") == "cat sat on mat"


def test_qa_f1_values() -> None:
    # pred tokens {cat, sat}; gold {cat, sat, on, mat}: P=1, R=0.5
    assert m.qa_f1("the cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    assert m.qa_f1("London", ["Paris", "london"]) == 1.0
    assert m.qa_f1("", "x") == 0.0
    assert m.qa_f1("x", []) == 0.0


def test_qa_f1_zh_is_per_character() -> None:
    assert m.qa_f1_zh("北京市", "北京") == pytest.approx(0.8)
    assert m.qa_f1_zh("北京。", ["北京"]) == 1.0


def test_lcs_and_rouge_l() -> None:
    assert m.lcs_length("ABCBDAB", "BDCABA") == 4
    assert m.lcs_length([], [1, 2]) == 0
    # "the cat sat on the mat" vs "the cat lay on the mat": LCS 5 of 6 and 6
    assert m.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert m.rouge_l("", "x") == 0.0
    assert m.rouge_l_zh("今天天气很好", "今天天气不错") == pytest.approx(4 / 6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=12),
       st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=12))
def test_lcs_properties(a: list[str], b: list[str]) -> None:
    n = m.lcs_length(a, b)
    assert n == m.lcs_length(b, a)
    assert 0 <= n <= min(len(a), len(b))
    assert m.lcs_length(a, a) == len(a)
    r = m.rouge_l(" ".join(a), " ".join(b))
    assert 0.0 <= r <= 1.0
    if a:
        assert m.rouge_l(" ".join(a), " ".join(a)) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# LongBench special metrics
# --------------------------------------------------------------------------------------------
def test_classification_score() -> None:
    classes = ["Individual", "City", "Country", "Date"]
    assert m.classification_score("City", "City", classes) == 1.0
    assert m.classification_score("City or Country", "City", classes) == 0.5
    assert m.classification_score("Date", "City", classes) == 0.0
    # a found class that is a strict substring of the gold one is ignored
    assert m.classification_score("Basketball", "Basketball", ["Ball", "Basketball"]) == 1.0


def test_retrieval_and_count() -> None:
    assert m.retrieval_score("Paragraph 2", "Paragraph 2") == 1.0
    assert m.retrieval_score("Paragraph 2 or Paragraph 3", "Paragraph 2") == 0.5
    assert m.retrieval_score("no idea", "Paragraph 2") == 0.0
    assert m.retrieval_zh_score("段落3", "段落3") == 1.0
    assert m.count_score("There are 2 paragraphs", "2") == 1.0
    assert m.count_score("2 or 3", "2") == 0.5
    assert m.count_score("none", "2") == 0.0


def test_code_sim_score_skips_fences_and_comments() -> None:
    pred = "```python\n# next line\n    return total\n```"
    assert m.code_sim_score(pred, "    return total") == 1.0
    assert 0.0 < m.code_sim_score("    return totl", "    return total") < 1.0


# --------------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The correct answer is (B)", "B"),
        ("**The correct answer is C**", "C"),
        ("Answer: D", "D"),
        ("the answer is a bit unclear, maybe (A)", "A"),
        ("B. Cloud services", "B"),
        ("C", "C"),
        ("I would pick option C here", "C"),
        ("no letter here", None),
        ("", None),
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    assert m.extract_choice(text) == expected


# --------------------------------------------------------------------------------------------
# structured outputs
# --------------------------------------------------------------------------------------------
GOLD_TSV = "Name\tAge\nBob Smith\t30\nAl Jones\t41\nCy Young\t25"


def test_tsv_row_f1() -> None:
    assert m.tsv_row_f1(GOLD_TSV, GOLD_TSV)["f1"] == 1.0
    # fenced block, different row order, header missing, cell punctuation/case
    pred = "Here it is:\n```tsv\ncy young\t25\nBob Smith.\t30\nAl Jones\t41\n```\nDone."
    assert m.tsv_row_f1(pred, GOLD_TSV)["f1"] == 1.0
    one_wrong = "Name\tAge\nBob Smith\t30\nAl Jones\t42\nCy Young\t25"
    r = m.tsv_row_f1(one_wrong, GOLD_TSV)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    missing = "Name\tAge\nBob Smith\t30"
    r = m.tsv_row_f1(missing, GOLD_TSV)
    assert r["precision"] == 1.0 and r["recall"] == pytest.approx(1 / 3)
    assert m.tsv_row_f1("", GOLD_TSV)["f1"] == 0.0
    # duplicates are not free recall
    dup = "Bob Smith\t30\nBob Smith\t30"
    assert m.tsv_row_f1(dup, GOLD_TSV)["precision"] == 0.5


def test_extract_tagged_and_line_f1() -> None:
    text = "<Solution>\n1 + 2 = 3\n</Solution> later <Solution>x</Solution>"
    assert m.extract_tagged(text, "Solution") == "x"
    assert m.extract_tagged("none", "Solution") is None
    assert m.line_f1("a\nb\nc", "a\nb\nd") == pytest.approx(2 / 3)


def test_relative_accuracy() -> None:
    assert m.relative_accuracy(45.0, 90.0) == pytest.approx(50.0)
    assert m.relative_accuracy(90.0, 90.0) == pytest.approx(100.0)
    assert math.isnan(m.relative_accuracy(10.0, 0.0))
    assert math.isnan(m.relative_accuracy(10.0, float("nan")))


def test_as_list_and_mean() -> None:
    assert m.as_list(None) == []
    assert m.as_list(3) == ["3"]
    assert m.as_list(["a", 2]) == ["a", "2"]
    assert math.isnan(m.mean([]))
    assert m.mean([1.0, 0.0]) == 0.5


def _task_row(task, method, budget, score, n, lo, hi, exact=None):
    metrics = {"score": score, "n": n, "ci95": [lo, hi]}
    if exact is not None:
        metrics["reference"] = {"exact": exact}
    return {"task": task, "method": method, "budget": budget, "metrics": metrics}


def test_task_table_cells_carry_interval_n_and_agreement() -> None:
    from kvbound.eval.report import task_table

    rows = [_task_row("syn_needle", "full", 0, 100.0, 32, 89.3, 100.0),
            _task_row("syn_needle", "trimkv", 64, 50.0, 32, 33.6, 66.4, exact=50.0),
            _task_row("syn_needle", "trimkv", 32, 12.5, 16, 3.5, 36.0, exact=12.5)]
    lines = task_table({"results": rows}).splitlines()
    assert lines[0] == "N per cell: 16, 32."
    assert lines[2] == "| task | method | M=32 | M=64 |"
    assert lines[4] == "| syn_needle | full | 100.0 [89, 100] | 100.0 [89, 100] |"
    assert lines[5] == ("| syn_needle | trimkv | 12.5 [4, 36] (N=16, too few for a claim) "
                        "(12% = full) | 50.0 [34, 66] (50% = full) |")
    # only the full cache (a task checked before the sweep): one score column, not empty cells
    only = task_table({"results": rows[:1]}).splitlines()
    assert only[2] == "| task | method | score |"
    assert only[4] == "| syn_needle | full | 100.0 [89, 100] |"

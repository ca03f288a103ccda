"""Answer extraction and scoring functions shared by all evaluation tasks.

Every per-example function returns a float in ``[0, 1]`` (or a bool); task scorers average them
and report percentages. No third-party dependency: ROUGE-L uses its own LCS, Chinese text is
tokenised per character (LongBench uses jieba; character tokens are a documented approximation),
and LongBench's ``code_sim_score`` uses :class:`difflib.SequenceMatcher` (the ratio that
``fuzzywuzzy.fuzz.ratio`` computes).
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = [
    "as_list",
    "classification_score",
    "code_sim_score",
    "count_score",
    "exact_match",
    "extract_answer",
    "extract_choice",
    "extract_last_number",
    "extract_tagged",
    "first_int",
    "last_boxed",
    "lcs_length",
    "line_f1",
    "math_equal",
    "mean",
    "normalize_answer",
    "normalize_math_answer",
    "normalize_number",
    "normalize_zh_answer",
    "numeric_equal",
    "parse_tsv",
    "qa_f1",
    "qa_f1_zh",
    "relative_accuracy",
    "retrieval_score",
    "retrieval_zh_score",
    "rouge_l",
    "rouge_l_zh",
    "string_match_all",
    "string_match_part",
    "substring_match",
    "token_f1",
    "tsv_row_f1",
]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def as_list(answer: object) -> list[str]:
    """Turn a gold answer (str, number, list of those, None) into a list of strings."""
    if answer is None:
        return []
    if isinstance(answer, (list, tuple)):
        return [str(a) for a in answer]
    return [str(answer)]


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; ``nan`` for an empty input."""
    vals = list(values)
    return sum(vals) / len(vals) if vals else float("nan")


def normalize_answer(text: str) -> str:
    """SQuAD/LongBench English normalisation: lower case, drop punctuation and articles, squash
    whitespace."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCT = set(string.punctuation)
_ZH_PUNCT = set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟"
    "〰〾〿–—‘’‛“”„‟…‧﹏."
)


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lower case, drop ASCII and CJK punctuation and all whitespace."""
    text = str(text).lower()
    return "".join(ch for ch in text if ch not in _PUNCT and ch not in _ZH_PUNCT and not ch.isspace())


# --------------------------------------------------------------------------------------------
# answer extraction
# --------------------------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, nested braces kept.

    ``\boxed 5`` (no braces) returns ``"5"``. Returns ``None`` when there is no complete box.
    """
    if text is None:
        return None
    text = str(text)
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    while idx >= 0:
        start = idx + (len("\\boxed") if text.startswith("\\boxed", idx) else len("\\fbox"))
        rest = text[start:]
        if rest.startswith(" ") and not rest.lstrip().startswith("{"):
            m = re.match(r"\s+([^\s$]+)", rest)
            if m:
                return m.group(1).rstrip(".")
        elif rest.startswith("{"):
            depth = 0
            for j, ch in enumerate(rest):
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        return rest[1:j].strip()
        # unbalanced or malformed: try an earlier box
        idx = max(text.rfind("\\boxed", 0, idx), text.rfind("\\fbox", 0, idx))
    return None


_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)


def extract_last_number(text: str) -> str | None:
    """Last number in ``text`` (thousands commas and simple fractions ``3/4`` allowed)."""
    if text is None:
        return None
    found = _NUMBER_RE.findall(str(text))
    return found[-1] if found else None


def extract_answer(text: str) -> str | None:
    r"""Final answer of a generated solution, GSM8K style.

    Order: last ``\boxed{}``; text after the last ``####``; the number after the last
    "the answer is" (also "final answer:"); otherwise the last number in the text.
    """
    if text is None:
        return None
    text = str(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        num = _NUMBER_RE.search(tail.replace("$", ""))
        if num:
            return num.group(0)
        if tail:
            return tail.split("\n")[0].strip()
    matches = list(
        re.finditer(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*:?\s*\$?\s*(" + _NUMBER + ")",
                    text, flags=re.IGNORECASE)
    )
    if matches:
        return matches[-1].group(1)
    return extract_last_number(text)


def normalize_number(text: object) -> str | None:
    """Canonical string of a number: ``"$1,000.00"`` -> ``"1000"``, ``"3.50"`` -> ``"3.5"``,
    ``"1/2"`` stays a fraction. ``None`` if ``text`` is not a plain number."""
    if text is None:
        return None
    s = str(text).strip()
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace(" ", "").rstrip(".")
    if "," in s:
        if not re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
            return None
        s = s.replace(",", "")
    s = s.removeprefix("+")
    if re.fullmatch(r"-?\d+/\d+", s):
        return s
    if not re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return None
    if "." in s:
        s = s.rstrip("0").rstrip(".")
        if s.startswith("-."):
            s = "-0" + s[1:]
        elif s.startswith("."):
            s = "0" + s
    if s in ("-0", ""):
        s = "0"
    if re.fullmatch(r"-?0\d+", s):
        s = str(int(s))
    return s


def _number_value(s: str | None) -> float | None:
    if s is None:
        return None
    if "/" in s:
        num, den = s.split("/")
        return int(num) / int(den) if int(den) != 0 else None
    try:
        return float(s)
    except ValueError:
        return None


def numeric_equal(pred: object, gold: object, rel_tol: float = 1e-6) -> bool:
    """True when both parse as numbers (see :func:`normalize_number`) and are equal within
    ``rel_tol`` (absolute 1e-9 near zero)."""
    a = _number_value(normalize_number(pred))
    b = _number_value(normalize_number(gold))
    if a is None or b is None:
        return False
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


# --------------------------------------------------------------------------------------------
# MATH-style equivalence
# --------------------------------------------------------------------------------------------
def _unwrap_command(s: str, command: str) -> str:
    """Replace ``\\command{X}`` by ``X`` (nested braces respected)."""
    token = "\\" + command + "{"
    while True:
        i = s.find(token)
        if i < 0:
            return s
        depth = 0
        j = i + len(token) - 1
        end = -1
        for k in range(j, len(s)):
            if s[k] == "{":
                depth += 1
            elif s[k] == "}":
                depth -= 1
                if depth == 0:
                    end = k
                    break
        if end < 0:
            return s
        s = s[:i] + s[j + 1 : end] + s[end + 1 :]


def _fix_fracs(s: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{2}`` -> ``\frac{1}{2}``, ``\frac{1}2`` likewise."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\d)", r"\\frac\1{\2}", s)
    return s


def normalize_math_answer(answer: object) -> str:
    r"""Normalise a MATH-style answer string for comparison.

    Strips ``$``, whitespace, ``\left``/``\right``, ``\!``/``\,``/``\;``/``\:``, unwraps
    ``\text{}``/``\textbf{}``/``\mathrm{}``/``\mathbf{}``/``\mbox{}``, maps ``\dfrac``/``\tfrac`` to
    ``\frac``, drops degree signs and ``%``, removes thousands separators, a leading ``x =`` and a
    trailing period, canonicalises ``\frac12``/``\sqrt2`` and plain numbers (``2.50`` -> ``2.5``).
    Units are out of scope.
    """
    s = "" if answer is None else str(answer).strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = s.replace("\\ ", "").replace("~", "")
    for cmd in ("text", "textbf", "textrm", "mathrm", "mathbf", "mbox", "operatorname"):
        s = _unwrap_command(s, cmd)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = s.replace("\\degree", "").replace("°", "").replace("degrees", "")
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = _fix_fracs(s)
    if s.count("=") == 1 and re.fullmatch(r"[a-zA-Z](?:_\w|_\{\w+\})?", s.split("=")[0]):
        s = s.split("=")[1]
    s = s.rstrip(".")
    if s.startswith("."):
        s = "0" + s
    num = normalize_number(s)
    if num is not None:
        s = num
    return s.lower()


def _latex_number(s: str) -> float | None:
    s = s.strip()
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    if m:
        try:
            den = float(m.group(3))
            return None if den == 0 else (-1 if m.group(1) else 1) * float(m.group(2)) / den
        except ValueError:
            return None
    return _number_value(normalize_number(s))


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _math_equal_norm(a: str, b: str) -> bool:
    if a == b:
        return True
    va, vb = _latex_number(a), _latex_number(b)
    if va is not None and vb is not None:
        return math.isclose(va, vb, rel_tol=1e-6, abs_tol=1e-9)
    # tuples / intervals: same brackets, element-wise
    if len(a) >= 2 and len(b) >= 2 and a[0] in "([" and b[0] in "([" and a[-1] in ")]":
        if a[0] == b[0] and a[-1] == b[-1]:
            pa, pb = _split_top_level(a[1:-1]), _split_top_level(b[1:-1])
            if len(pa) == len(pb) > 1:
                return all(_math_equal_norm(x, y) for x, y in zip(pa, pb))
        return False
    # unbracketed lists ("-2,1"): equal as multisets
    pa, pb = _split_top_level(a), _split_top_level(b)
    if len(pa) == len(pb) > 1:
        remaining = list(pb)
        for x in pa:
            hit = next((y for y in remaining if _math_equal_norm(x, y)), None)
            if hit is None:
                return False
            remaining.remove(hit)
        return True
    return False


def math_equal(pred: object, gold: object) -> bool:
    r"""MATH-style equivalence of two final answers.

    Equal after :func:`normalize_math_answer`, or numerically equal (``\frac{1}{2}`` == ``0.5``
    == ``1/2``), or tuples/intervals equal element-wise, or comma lists equal as multisets.
    Symbolic equivalence beyond that (``2\sqrt{2}`` vs ``\sqrt{8}``) is not attempted.
    """
    if pred is None or gold is None:
        return False
    a, b = normalize_math_answer(pred), normalize_math_answer(gold)
    if not a or not b:
        return False
    return _math_equal_norm(a, b)


# --------------------------------------------------------------------------------------------
# string matching (RULER, retrieval)
# --------------------------------------------------------------------------------------------
def exact_match(pred: str, gold: object, normalize: bool = True) -> float:
    """1.0 if ``pred`` equals any gold answer (after :func:`normalize_answer` by default)."""
    golds = as_list(gold)
    if pred is None or not golds:
        return 0.0
    f = normalize_answer if normalize else (lambda x: str(x).strip())
    p = f(pred)
    return float(any(p == f(g) for g in golds))


def substring_match(pred: str, gold: object, normalize: bool = True) -> float:
    """1.0 if any gold answer occurs in ``pred`` (normalised text, or case-insensitively)."""
    golds = as_list(gold)
    if pred is None or not golds:
        return 0.0
    if normalize:
        p = f" {normalize_answer(pred)} "
        return float(any(normalize_answer(g) and f" {normalize_answer(g)} " in p for g in golds))
    return float(any(g.lower() in str(pred).lower() for g in golds))


def string_match_all(pred: str, refs: object) -> float:
    """RULER ``string_match_all``: fraction of references found in ``pred`` (case-insensitive)."""
    refs = as_list(refs)
    if not refs:
        return 0.0
    p = "" if pred is None else str(pred).lower()
    return sum(r.lower() in p for r in refs) / len(refs)


def string_match_part(pred: str, refs: object) -> float:
    """RULER ``string_match_part``: 1.0 if any reference occurs in ``pred`` (case-insensitive)."""
    refs = as_list(refs)
    p = "" if pred is None else str(pred).lower()
    return float(any(r.lower() in p for r in refs))


# --------------------------------------------------------------------------------------------
# token F1 / ROUGE-L (LongBench)
# --------------------------------------------------------------------------------------------
def token_f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> tuple[float, float, float]:
    """``(f1, precision, recall)`` of two token multisets."""
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0, 0.0, 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall), precision, recall


def qa_f1(pred: str, gold: object) -> float:
    """LongBench/SQuAD token F1 (English normalisation), max over gold answers."""
    p = normalize_answer(pred or "").split()
    return max((token_f1(p, normalize_answer(g).split())[0] for g in as_list(gold)), default=0.0)


def qa_f1_zh(pred: str, gold: object) -> float:
    """Chinese token F1 with one token per character, max over gold answers."""
    p = list(normalize_zh_answer(pred or ""))
    return max((token_f1(p, list(normalize_zh_answer(g)))[0] for g in as_list(gold)), default=0.0)


def lcs_length(a: Sequence[object], b: Sequence[object]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def _rouge_l_tokens(p: Sequence[str], g: Sequence[str]) -> float:
    if not p or not g:
        return 0.0
    lcs = lcs_length(p, g)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str, gold: object) -> float:
    """ROUGE-L F1 over lower-cased word tokens (``\\w+``), max over gold answers."""
    p = re.findall(r"\w+", (pred or "").lower())
    return max((_rouge_l_tokens(p, re.findall(r"\w+", g.lower())) for g in as_list(gold)),
               default=0.0)


def rouge_l_zh(pred: str, gold: object) -> float:
    """ROUGE-L F1 over characters of normalised Chinese text, max over gold answers."""
    p = list(normalize_zh_answer(pred or ""))
    return max((_rouge_l_tokens(p, list(normalize_zh_answer(g))) for g in as_list(gold)),
               default=0.0)


# --------------------------------------------------------------------------------------------
# LongBench special metrics
# --------------------------------------------------------------------------------------------
def classification_score(pred: str, gold: str, all_classes: Sequence[str]) -> float:
    """LongBench classification: the class names found in ``pred``; a found class that is a
    strict substring of the gold class is ignored; score ``1/len(found)`` if gold is among them."""
    pred = pred or ""
    found = [c for c in all_classes if c in pred]
    found = [c for c in found if not (c in gold and c != gold)]
    return 1.0 / len(found) if gold in found else 0.0


def _retrieval(pred: str, gold: str, pattern: str) -> float:
    ids = re.findall(pattern, gold)
    if not ids:
        return 0.0
    numbers = re.findall(r"\d+", pred or "")
    if not numbers:
        return 0.0
    return sum(n == ids[0] for n in numbers) / len(numbers)


def retrieval_score(pred: str, gold: str) -> float:
    """LongBench passage retrieval: share of numbers in ``pred`` equal to the gold paragraph id
    (gold looks like ``"Paragraph 12"``)."""
    return _retrieval(pred, gold, r"Paragraph (\d+)")


def retrieval_zh_score(pred: str, gold: str) -> float:
    """Chinese passage retrieval (gold looks like ``"段落12"``)."""
    return _retrieval(pred, gold, r"段落(\d+)")


def count_score(pred: str, gold: str) -> float:
    """LongBench passage count: share of numbers in ``pred`` equal to the gold count."""
    numbers = re.findall(r"\d+", pred or "")
    if not numbers:
        return 0.0
    return sum(n == str(gold).strip() for n in numbers) / len(numbers)


def code_sim_score(pred: str, gold: str) -> float:
    """LongBench code similarity: the first prediction line that is not a comment or a code
    fence, compared with the gold line by :class:`difflib.SequenceMatcher` ratio."""
    line = ""
    for candidate in (pred or "").lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return difflib.SequenceMatcher(None, line, str(gold)).ratio()


def first_int(text: str) -> str:
    """The first run of digits in ``text`` (``""`` if none)."""
    m = re.search(r"\d+", text or "")
    return m.group(0) if m else ""


# --------------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------------
def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """Chosen option letter of a multiple-choice answer, or ``None``.

    Tries, in order: "The correct answer is (X)" / "answer is X" / "Answer: X"; a bracketed
    letter ``(X)``; a reply that starts with the letter (``"B."``, ``"C)"``, ``"D"``); finally a
    standalone capital letter anywhere. Markdown ``*`` are ignored.
    """
    if not text:
        return None
    t = str(text).replace("*", "")
    cls = f"[{letters}]"
    patterns = [
        rf"(?i:correct\s+answer\s+is)\s*:?\s*\(?({cls})\)?(?![A-Za-z])",
        rf"(?i:answer)(?:\s+(?i:is))?\s*:?\s*\(?({cls})\)?(?![A-Za-z])",
        rf"(?i:option)\s*:?\s*\(?({cls})\)?(?![A-Za-z])",
        rf"\(({cls})\)",
    ]
    for pat in patterns:
        m = re.search(pat, t)
        if m:
            return m.group(1)
    m = re.match(rf"\s*({cls})(?:[.):\s]|$)", t)
    if m:
        return m.group(1)
    m = re.search(rf"(?<![A-Za-z])({cls})(?![A-Za-z])", t)
    return m.group(1) if m else None


# --------------------------------------------------------------------------------------------
# structured outputs (LongProc-style)
# --------------------------------------------------------------------------------------------
def extract_tagged(text: str, tag: str) -> str | None:
    """Content of the last ``<tag>...</tag>`` block, stripped, or ``None``."""
    if not text:
        return None
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def _tsv_cell(cell: str) -> str:
    return normalize_answer(cell).replace(" ", "")


def parse_tsv(text: str) -> list[tuple[str, ...]]:
    """Rows of a TSV answer (a fenced ```` ```tsv ```` block is preferred when present); cells are
    normalised (lower case, no punctuation, articles or spaces); lines without a tab are skipped
    unless every line lacks one (single-column tables)."""
    if text is None:
        return []
    text = str(text)
    m = re.search(r"```(?:tsv)?\s*\n(.*?)```", text, flags=re.DOTALL)
    if m:
        text = m.group(1)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if any("\t" in ln for ln in lines):
        lines = [ln for ln in lines if "\t" in ln]
    return [tuple(_tsv_cell(c) for c in ln.strip().split("\t")) for ln in lines]


def tsv_row_f1(pred: str, gold: str, has_header: bool = True) -> dict[str, float]:
    """Row-level precision / recall / F1 of a TSV prediction against a gold TSV.

    Rows match when all normalised cells are equal (order of rows is ignored; duplicates are
    counted as a multiset). With ``has_header`` the gold's first row is the header: it is not
    scored, and the prediction's first row is dropped only if it equals that header.
    """
    gold_rows = parse_tsv(gold)
    pred_rows = parse_tsv(pred)
    if has_header and gold_rows:
        header = gold_rows[0]
        gold_rows = gold_rows[1:]
        if pred_rows and pred_rows[0] == header:
            pred_rows = pred_rows[1:]
    if not gold_rows and not pred_rows:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    if not gold_rows or not pred_rows:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    f1, precision, recall = token_f1(pred_rows, gold_rows)
    return {"precision": precision, "recall": recall, "f1": f1}


def line_f1(pred: str, gold: str) -> float:
    """F1 between the multisets of non-empty, whitespace-squashed lines of two outputs."""
    def lines(s: str) -> list[str]:
        return [" ".join(ln.split()) for ln in (s or "").splitlines() if ln.strip()]

    return token_f1(lines(pred), lines(gold))[0]


# --------------------------------------------------------------------------------------------
# aggregates
# --------------------------------------------------------------------------------------------
def relative_accuracy(score: float, full_cache_score: float) -> float:
    """Score under a KV budget as a percentage of the full-cache score (``nan`` when the
    full-cache score is 0 or not finite: the ratio is undefined)."""
    if not math.isfinite(full_cache_score) or full_cache_score <= 0:
        return float("nan")
    return 100.0 * score / full_cache_score

"""Small PromQL helpers for the tests: the metric names a query reads, and alert expressions without their filter."""

from __future__ import annotations

import re

KEYWORDS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "abs",
    "changes",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "label_values",
    "vector",
    "le",
    "topk",
    "bottomk",
    "delta",
    "deriv",
    "clamp_min",
    "clamp_max",
    "time",
    "absent",
    "inf",
    "nan",
}


def _strip(expr: str) -> str:
    """The expression without label matchers {...}, range/offset brackets [...] and string literals."""
    out, depth_brace, quote = [], 0, None
    for ch in expr:
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "\"'`":
            quote = ch
            continue
        if ch == "{":
            depth_brace += 1
            continue
        if ch == "}":
            depth_brace -= 1
            continue
        if depth_brace:
            continue
        out.append(ch)
    return re.sub(r"\[[^\]]*\]", " ", "".join(out))


def metric_names(expr: str) -> set[str]:
    """Identifiers that name series in ``expr`` (functions, keywords and grouping labels excluded)."""
    text = _strip(expr)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end() :].lstrip()
        if word in KEYWORDS or following.startswith("("):
            continue
        names.add(word)
    return names


COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)")


def unfiltered(expr: str) -> str:
    """``expr`` with ``bool`` after every comparison outside label matchers and strings.

    ``up == 0`` keeps only broken targets; ``up == bool 0`` returns every target with 0/1. Evaluating an alert
    expression this way shows whether its data exists without waiting for the alert to fire.
    """
    out, i, depth, quote = [], 0, 0, None
    while i < len(expr):
        ch = expr[i]
        if quote:
            out.append(ch)
            if ch == quote:
                quote = None
            i += 1
            continue
        if ch in "\"'`":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif depth == 0:
            m = COMPARISON.match(expr, i)
            if m and not expr[i:].startswith("=~") and not expr[i:].startswith("!~"):
                out.append(m.group(0) + " bool")
                i = m.end()
                continue
        out.append(ch)
        i += 1
    return "".join(out)

"""Config regexes mean what a zrepl user wrote (issue 8 item 10): zrepl compiles them with Go's RE2.

compile_regex translates RE2 to Python `re` with RE2's meaning, translates RE2 syntax Python lacks,
and refuses what RE2 refuses or Python cannot express, with why. Expected values are RE2's
(documented in https://github.com/google/re2/wiki/Syntax and Go's regexp/syntax).
"""

import random
import re
import warnings

import pytest


import zrepl  # noqa: E402
from zrepl import KeepRegex, PruneContext, Version, compile_regex, decide_prune  # noqa: E402


def matches(pattern: str, text: str) -> bool:
    return compile_regex(pattern).search(text) is not None


ASCII = [chr(c) for c in range(128)]
POSIX = {  # RE2's POSIX classes over ASCII
    "alnum": str.isalnum, "alpha": str.isalpha, "ascii": lambda c: True, "blank": lambda c: c in " \t",
    "cntrl": lambda c: ord(c) < 32 or ord(c) == 127, "digit": str.isdigit, "graph": lambda c: 33 <= ord(c) <= 126,
    "lower": str.islower, "print": lambda c: 32 <= ord(c) <= 126,
    "punct": lambda c: 33 <= ord(c) <= 126 and not c.isalnum(), "space": lambda c: c in " \t\n\v\f\r",
    "upper": str.isupper, "word": lambda c: c.isalnum() or c == "_", "xdigit": lambda c: c in "0123456789abcdefABCDEF",
}


@pytest.mark.parametrize("name", sorted(POSIX))
def test_posix_classes_match_as_in_re2(name):
    test = POSIX[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Python's FutureWarning for "[[" must never appear
        positive, negative = compile_regex(f"^[[:{name}:]]$"), compile_regex(f"^[[:^{name}:]]$")
        outside = compile_regex(f"^[^[:{name}:]]$")
    for c in ASCII:
        assert bool(positive.search(c)) == bool(test(c)), (name, c)
        assert bool(negative.search(c)) != bool(test(c)), (name, c)
        assert bool(outside.search(c)) != bool(test(c)), (name, c)


def test_posix_class_protects_manual_snapshots():
    """The scenario of the issue: `[[:digit:]]` in Python `re` is a set of '[', ':', 'd', ... and
    matched nothing, so a protective regex rule protected nothing and manual_2024 was destroyed."""
    snaps = [Version("tank/data", "manual_2024", "snapshot", 1, 1, 1),
             Version("tank/data", "zrepl_x", "snapshot", 2, 2, 2)]
    decision = decide_prune(snaps, [KeepRegex("_[[:digit:]]+$")], PruneContext())
    assert [v.name for v in decision.destroy] == ["zrepl_x"]


@pytest.mark.parametrize("pattern,text,expected", [
    ("[[:digit:]x]", "x", True), ("[[:digit:]x]", "5", True), ("[[:digit:]x]", "y", False),
    ("[^[:digit:]x]", "y", True), ("[^[:digit:]x]", "5", False),
    ("[[:^digit:]x]", "x", True), ("[[:^digit:]x]", "y", True), ("[[:^digit:]x]", "5", False),
    ("[^[:^digit:]]", "5", True), ("[^[:^digit:]]", "a", False),
    ("[^[:^alpha:][:^lower:]]", "a", True), ("[^[:^alpha:][:^lower:]]", "A", False),
    ("[\\d_]", "_", True), ("[\\D]", "5", False), ("[^\\S]", " ", True), ("[^\\S]", "x", False),
    ("[]a]", "]", True), ("[a-]", "-", True), ("[a\\-z]", "b", False), ("[\\x41-\\x43]", "B", True),
    ("[--/]", ".", True), ("[a&&b]", "&", True), ("[a~~b]", "~", True), ("[[a]", "[", True),
])
def test_character_classes(pattern, text, expected):
    assert matches(pattern, text) == expected


@pytest.mark.parametrize("pattern,text,expected", [
    ("a$", "a\n", False),  # RE2's $ is the end of the text; Python's also matches before a final \n
    ("a$", "a", True),
    ("(?m)a$", "a\nb", True),  # multi-line: the end of a line, in both
    ("a\\z", "a", True), ("a\\z", "a\n", False),
    ("^a", "b\na", False), ("(?m)^a", "b\na", True),
    ("\\s", "\v", False),  # RE2's \s is [\t\n\f\r ]; Python's includes \v
    ("\\S", "\v", True),
    ("\\d", "\u0663", False), ("\\w", "\u00e9", False), ("\\bx", "\u00e9x", True),  # ASCII in RE2
    ("a{,3}", "a{,3}", True), ("a{,3}", "aa", False),  # {,n} is a literal in RE2
    ("x{2}", "xx", True), ("x{2,}", "xxx", True), ("x{1,2}?y", "xy", True),
    ("\\Qa.b*\\E", "a.b*", True), ("\\Qa.b\\E", "axb", False), ("\\Qtail", "tail", True),
    ("\\x{41}\\x42", "AB", True), ("\\101", "A", True), ("\\0", "\0", True), ("\\12", "\n", True),
    ("(?<year>\\d{4})", "2024", True), ("(?P<year>\\d{4})", "2024", True),
    ("x(?i)ab|c", "xAB", True), ("x(?i)ab|c", "C", True), ("x(?i)ab|c", "Xab", False),
    ("(x(?i)a)b", "xAb", True), ("(x(?i)a)b", "xAB", False),
    ("(?i:a)b", "Ab", True), ("(?i-s:a.)", "A\n", False), ("(?s).", "\n", True), ("a.b", "a\nb", False),
    ("(?m:a$)b", "a\nb", False), ("\\.", ".", True), ("\\#\\ ", "# ", True), ("a|", "", True),
])
def test_meanings_differing_between_re2_and_python_follow_re2(pattern, text, expected):
    assert matches(pattern, text) == expected


@pytest.mark.parametrize("pattern,needle", [
    ("(a)\\1", "backreferences"), ("\\9", "backreferences"), ("(?P=n)", "backreferences"),
    ("a(?=b)", "lookahead"), ("a(?!b)", "lookahead"), ("(?<=a)b", "lookbehind"), ("(?<!a)b", "lookbehind"),
    ("(?>a)", "atomic"), ("a++", "possessive"), ("a*+", "possessive"), ("a{2}+", "possessive"), ("a?+", "possessive"),
    ("(?#x)", "comments"), ("(?(1)a|b)", "conditionals"),
    ("\\Z", "'\\Z' is not RE2"), ("\\C", "no Python equivalent"), ("\\pN", "Unicode classes"),
    ("\\p{Greek}", "Unicode classes"), ("[\\PL]", "Unicode classes"), ("(?U)a+", "ungreedy"),
    ("(?x) a", "this group syntax"), ("(?a)x", "this group syntax"), ("\\N{DIGIT ONE}", "invalid escape"),
    ("\\e", "invalid escape"), ("\\y", "invalid escape"), ("a\\", "trailing backslash"), ("[\\b]", "not allowed"),
    ("[[:foo:]]", "unknown POSIX class"), ("[z-a]", "invalid character class range"), ("[abc", "missing closing ]"),
    ("(a", "missing closing )"), ("a)", "unexpected )"), ("a{1001}", "larger than 1000"),
    ("a{4294967296}", "larger than 1000"), ("a{2,1}", "invalid repeat count"), ("a**", "nested repetition"),
    ("(" * 600 + ")" * 600, "nested more than"), ("(?)", "missing flags"),
])
def test_refused_with_why(pattern, needle):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError) as info:
            compile_regex(pattern)
    assert needle in str(info.value) and "RE2" in str(info.value) or needle in str(info.value)


def test_plain_patterns_mean_the_same_in_both():
    """For patterns both engines read alike (no classes, anchors or escapes that differ), the
    translation changes nothing: random patterns from a safe alphabet, random names."""
    rng = random.Random(7)
    atoms = ["a", "b", "z_", "0", "1", ".", "[ab]", "[0-9]", "(a|b)", "(?:x|y)", "-", ":", " "]
    names = ["".join(rng.choice("abxyz01_-: .") for _ in range(rng.randrange(0, 8))) for _ in range(200)]
    for _ in range(300):
        quantifiers = ["", "*", "+", "?", "{1,2}"]
        pattern = "".join(rng.choice(atoms) + rng.choice(quantifiers) for _ in range(rng.randrange(1, 4)))
        pattern = rng.choice(["", "^"]) + pattern
        plain, ours = re.compile(pattern), compile_regex(pattern)
        assert [bool(plain.search(n)) for n in names] == [bool(ours.search(n)) for n in names], pattern


def test_config_reports_regex_errors_on_the_key_without_warnings(recwarn):
    text = """
[[jobs]]
name = "j"
type = "snap"
filesystems = { "tank<" = true }
snapshotting = { type = "manual" }
[jobs.pruning]
keep = [
  { type = "regex", regex = "[[:alpha:]]+" },
  { type = "last_n", count = 1, regex = "a{99999999999}" },
  { type = "grid", grid = "1x1h", regex = "x++" },
]
"""
    with pytest.raises(zrepl.ConfigErrors) as info:
        zrepl.parse_config(text, "t.toml")
    assert [e.path for e in info.value.errors] == ["jobs[0].pruning.keep[1].regex", "jobs[0].pruning.keep[2].regex"]
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]

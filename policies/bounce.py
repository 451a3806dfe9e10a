"""Bounce classification: what a remote SMTP reply (or a failure without one) means for a recipient.

The delivery loop hands every final reply for a recipient to :meth:`BounceClassifier.classify` and every
failure that produced no reply (DNS, connect, TLS, timeout, broken protocol) to
:meth:`BounceClassifier.classify_failure`. The answer is a :class:`Classification`: the outcome
(``delivered`` / ``temporary`` / ``permanent``), a category for statistics and suppression
(``invalid_recipient``, ``mailbox_full``, ``rate_limited``, …), the RFC 3463 status to report in a DSN,
and whether the reply asks us to slow down (``rate_signal``, read by the throttle).

Invariants:
- The outcome comes from the reply code: 2xx delivered, 4xx temporary, 5xx permanent — except that where
  the code and the enhanced status code disagree between class 4 and class 5, the enhanced code wins
  (RFC 3463 status codes are the more deliberate statement of the two). A 2xx is always delivered.
- Anything that is not a well-formed 2xx/4xx/5xx reply (garbage, 1xx/3xx at the wrong time) is a
  *temporary* protocol failure — never an exception and never a permanent bounce, because an unknown
  condition must not lose mail.
- Rules only choose the category (and may explicitly override temporary/permanent); no rule can turn a
  failure into a delivery. Rules are tried in order and the first match wins; rules from ``relay.toml``
  come before the shipped ``bounce_rules.toml`` so admins can override any shipped decision.
- The reported status always has the class of the outcome (``5.x.x`` for permanent, ``4.x.x`` for
  temporary), so a DSN never says "failed" with a 4.x.x status produced by an override.

This module is pure: standard library only, no I/O except reading the shipped rules file once.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Outcome = Literal["delivered", "temporary", "permanent"]
FailureKind = Literal["dns", "connect", "tls", "timeout", "protocol"]

RULES_FILE = "bounce_rules.toml"

# Replies are untrusted network input: bound what we keep and what the regular expressions scan.
MAX_REPLY_TEXT = 4096

# "550-5.1.1 text" / "550 text" / "550" — a three-digit code of class 2..5, then "-", " " or nothing.
_REPLY_LINE = re.compile(r"^([2-5]\d\d)(?:[ -](.*))?$", re.DOTALL | re.ASCII)
# RFC 3463: class "." subject "." detail, 1–3 digits each; some servers prefix it with "#".
_ENHANCED_AT_START = re.compile(r"^#?([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)", re.ASCII)
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]+")
_SPACES = re.compile(r"\s{2,}")

_OUTCOME_CLASS: dict[str, str] = {"delivered": "2", "temporary": "4", "permanent": "5"}


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    """One SMTP reply: the three-digit code (0 when unparseable), the enhanced code and the text.

    ``text`` is the reply text of all lines joined by single spaces, with the code and any leading
    enhanced code of each line removed and control characters (CR, LF, NUL, …) replaced; it is safe to
    log and to put into a DSN field once folded.
    """

    code: int
    enhanced: str | None
    text: str

    @classmethod
    def parse(cls, lines: Sequence[str] | str | bytes) -> Reply:
        """Parse a raw (possibly multi-line) reply; garbage yields ``Reply(0, None, <cleaned text>)``."""
        raw_lines = _split_reply_lines(lines)
        code = 0
        enhanced: str | None = None
        texts: list[str] = []
        for line in raw_lines:
            match = _REPLY_LINE.match(line.strip())
            if match is None:
                texts.append(line)  # a continuation without a code: keep the words, they may matter
                continue
            if code == 0:
                code = int(match.group(1))
            rest = (match.group(2) or "").strip()
            found = _ENHANCED_AT_START.match(rest)
            if found is not None:
                if enhanced is None:
                    enhanced = _normalise_enhanced(found.group(1), found.group(2), found.group(3))
                rest = rest[found.end():]
            texts.append(rest)
        return cls(code=code, enhanced=enhanced, text=clean_reply_text(" ".join(texts)))

    def __str__(self) -> str:
        parts = [str(self.code) if self.code else "000"]
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)


@dataclass(frozen=True)
class Classification:
    """What a reply or failure means for one recipient.

    ``enhanced`` is the RFC 3463 status to report (its class always matches ``outcome``);
    ``rate_signal`` tells the throttle the destination wants us to slow down; ``rule`` names the rule
    that chose the category (for logs; not part of equality).
    """

    outcome: Outcome
    category: str
    enhanced: str
    rate_signal: bool = False
    rule: str | None = field(default=None, compare=False)

    @property
    def is_permanent(self) -> bool:
        return self.outcome == "permanent"

    @property
    def is_temporary(self) -> bool:
        return self.outcome == "temporary"


def clean_reply_text(text: str) -> str:
    """Control characters become spaces, runs of white space collapse, length is bounded."""
    text = _CONTROL_CHARS.sub(" ", text)
    text = _SPACES.sub(" ", text).strip()
    return text[:MAX_REPLY_TEXT]


def _split_reply_lines(lines: Sequence[str] | str | bytes) -> list[str]:
    if isinstance(lines, bytes):
        lines = lines.decode("utf-8", errors="replace")
    if isinstance(lines, str):
        lines = lines.splitlines()
    out: list[str] = []
    for line in lines:
        # A list may itself hold "a\r\nb" (some clients hand back the raw block as one element).
        out.extend(piece for piece in str(line).splitlines() if piece.strip())
    return out


def _normalise_enhanced(cls_digit: str, subject: str, detail: str) -> str:
    # RFC 3464 2.3.4: no leading zeros in any sub-field.
    return f"{int(cls_digit)}.{int(subject)}.{int(detail)}"


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------

_RULE_KEYS = frozenset({"name", "category", "outcome", "code", "enhanced", "text", "rate_signal"})
_CATEGORY_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_CODE_PATTERN = re.compile(r"^[2-5x][0-9x][0-9x]$")
_ENHANCED_PATTERN = re.compile(r"^[245x](\.(\d{1,3}|x)){0,2}$", re.ASCII)
_OVERRIDABLE_OUTCOMES = ("temporary", "permanent")


@dataclass(frozen=True)
class BounceRule:
    """One classification rule; every matcher it has must match (a rule with none is refused).

    ``codes``: three-character patterns such as ``"550"`` or ``"4xx"``; ``enhanced``: status prefixes
    compared by sub-field, such as ``("x", "1", "1")`` (so ``x.1.1`` never matches ``5.1.10``);
    ``text``: searched case-insensitively in the reply text.
    """

    name: str
    category: str
    outcome: Literal["temporary", "permanent"] | None = None
    codes: tuple[str, ...] = ()
    enhanced: tuple[tuple[str, ...], ...] = ()
    text: re.Pattern[str] | None = None
    rate_signal: bool | None = None

    def matches(self, reply: Reply) -> bool:
        if self.codes and not any(_code_matches(p, reply.code) for p in self.codes):
            return False
        if self.enhanced and not any(_enhanced_matches(p, reply.enhanced) for p in self.enhanced):
            return False
        return self.text is None or self.text.search(reply.text) is not None


def _code_matches(pattern: str, code: int) -> bool:
    if code == 0:
        return False
    digits = f"{code:03d}"
    return all(p in ("x", d) for p, d in zip(pattern, digits, strict=True))


def _enhanced_matches(prefix: tuple[str, ...], enhanced: str | None) -> bool:
    if enhanced is None:
        return False
    parts = enhanced.split(".")
    return len(prefix) <= len(parts) and all(p in ("x", v) for p, v in zip(prefix, parts, strict=False))


def parse_rules(entries: object, source: str) -> tuple[BounceRule, ...]:
    """Validate a list of rule tables; raise :class:`ValueError` naming ``source[i]`` on any problem."""
    if not isinstance(entries, list):
        raise ValueError(f"{source}: must be a list of rule tables, got {type(entries).__name__}")
    return tuple(parse_rule(entry, f"{source}[{index}]") for index, entry in enumerate(entries))


def parse_rule(entry: object, where: str) -> BounceRule:
    """Validate one rule table (``where`` names it in error messages)."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: a rule must be a table, got {type(entry).__name__}")
    label = _rule_label(entry, where)
    unknown = sorted(str(key) for key in entry if key not in _RULE_KEYS)
    if unknown:
        raise ValueError(f"{label}: unknown key(s) {', '.join(map(repr, unknown))} "
                         f"(allowed: {', '.join(sorted(_RULE_KEYS))})")
    category = _rule_category(entry.get("category"), label)
    rule = BounceRule(
        name=str(entry.get("name") or category),
        category=category,
        outcome=_rule_outcome(entry.get("outcome"), label),
        codes=_rule_codes(entry.get("code"), label),
        enhanced=_rule_enhanced(entry.get("enhanced"), label),
        text=_rule_text(entry.get("text"), label),
        rate_signal=_rule_rate_signal(entry.get("rate_signal"), label),
    )
    if not (rule.codes or rule.enhanced or rule.text):
        raise ValueError(f"{label}: needs at least one of 'code', 'enhanced' or 'text' "
                         "(a rule matching everything would hide every rule after it)")
    return rule


def _rule_label(entry: Mapping[object, object], where: str) -> str:
    name = entry.get("name") or entry.get("category")
    return f"{where} ({name!r})" if isinstance(name, str) else where


def _rule_category(value: object, label: str) -> str:
    if not isinstance(value, str) or not _CATEGORY_NAME.match(value):
        raise ValueError(f"{label}: 'category' is required and must be a lower-case name such as "
                         f"'invalid_recipient', got {value!r}")
    return value


def _rule_outcome(value: object, label: str) -> Literal["temporary", "permanent"] | None:
    if value is None:
        return None
    if value == "temporary":
        return "temporary"
    if value == "permanent":
        return "permanent"
    # "delivered" is refused on purpose: a rule must never turn a failure into a silent drop.
    raise ValueError(f"{label}: 'outcome' must be 'temporary' or 'permanent', got {value!r}")


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _rule_codes(value: object, label: str) -> tuple[str, ...]:
    if value is None:
        return ()
    codes: list[str] = []
    for item in _as_list(value):
        if isinstance(item, int) and not isinstance(item, bool) and 200 <= item <= 599:
            codes.append(str(item))
        elif isinstance(item, str) and _CODE_PATTERN.match(item.lower()):
            codes.append(item.lower())
        else:
            raise ValueError(f"{label}: 'code' entries must be reply codes like 550 or patterns like "
                             f"'4xx' / '55x', got {item!r}")
    if not codes:
        raise ValueError(f"{label}: 'code' must not be an empty list")
    return tuple(codes)


def _rule_enhanced(value: object, label: str) -> tuple[tuple[str, ...], ...]:
    if value is None:
        return ()
    prefixes: list[tuple[str, ...]] = []
    for item in _as_list(value):
        if not isinstance(item, str) or not _ENHANCED_PATTERN.match(item.lower()):
            raise ValueError(f"{label}: 'enhanced' entries must be status prefixes like '5.1.1', "
                             f"'x.1.1' or 'x.7', got {item!r}")
        prefixes.append(tuple(part if part == "x" else str(int(part)) for part in item.lower().split(".")))
    if not prefixes:
        raise ValueError(f"{label}: 'enhanced' must not be an empty list")
    return tuple(prefixes)


def _rule_text(value: object, label: str) -> re.Pattern[str] | None:
    if value is None:
        return None
    alternatives = _as_list(value)
    if not alternatives or not all(isinstance(alt, str) and alt for alt in alternatives):
        raise ValueError(f"{label}: 'text' must be a non-empty regular expression or a list of them")
    pattern = "|".join(f"(?:{alt})" for alt in alternatives)
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"{label}: 'text' is not a valid regular expression: {exc}") from None


def _rule_rate_signal(value: object, label: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"{label}: 'rate_signal' must be true or false, got {value!r}")


@functools.cache
def shipped_rules() -> tuple[BounceRule, ...]:
    """The rules of the packaged ``bounce_rules.toml`` (read and validated once per process)."""
    package = __package__ or "relay.policies"
    text = importlib.resources.files(package).joinpath(RULES_FILE).read_text(encoding="utf-8")
    data = tomllib.loads(text)
    unknown = sorted(set(data) - {"rule"})
    if unknown:
        raise ValueError(f"{RULES_FILE}: unknown top-level key(s) {', '.join(unknown)}")
    return parse_rules(data.get("rule", []), f"{RULES_FILE}: rule")


# ------------------------------------------------------------------------------------------------
# Classifier
# ------------------------------------------------------------------------------------------------

# Failures without a reply: (category, status detail when temporary, status detail when permanent).
# Detail sub-codes per RFC 3463: 4.3 directory server failure, 1.2 bad destination system, 4.1 no
# answer from host, 4.4 unable to route, 4.2 bad connection, 7.5 cryptographic failure, 5.0 protocol.
_FAILURES: dict[str, tuple[str, str, str]] = {
    "dns": ("dns_failure", "4.3", "1.2"),
    "connect": ("connection_failure", "4.1", "4.4"),
    "tls": ("tls_failure", "7.5", "7.5"),
    "timeout": ("connection_failure", "4.2", "4.2"),
    "protocol": ("other", "5.0", "5.0"),
}


class BounceClassifier:
    """Classifies replies with an ordered rule list (first match wins, ``other`` when none does)."""

    def __init__(self, rules: Sequence[BounceRule]) -> None:
        self._rules = tuple(rules)

    @classmethod
    def default(cls) -> BounceClassifier:
        """The shipped rules only."""
        return cls(shipped_rules())

    @classmethod
    def with_rules(cls, extra: Sequence[Mapping[str, object]],
                   source: str = "bounce_rules") -> BounceClassifier:
        """The admin's ``extra`` rules (tried first) followed by the shipped rules.

        Raises :class:`ValueError` naming the bad rule (``source[i] ('name')``) when one is invalid.
        """
        entries = list(extra) if isinstance(extra, tuple) else extra
        return cls(parse_rules(entries, source) + shipped_rules())

    @property
    def rules(self) -> tuple[BounceRule, ...]:
        return self._rules

    def classify(self, reply: Reply) -> Classification:
        outcome = outcome_of(reply)
        if outcome is None:
            # Garbage or a 1xx/3xx where a final reply belongs: the session is broken, try again later.
            return Classification("temporary", "other", "4.5.0", rule="protocol")
        if outcome == "delivered":
            return Classification("delivered", "delivered", reported_status(reply.enhanced, outcome))
        rule = self._first_match(reply)
        category = rule.category if rule else "other"
        if rule is not None and rule.outcome is not None:
            outcome = rule.outcome
        rate_signal = reply.code == 421 or category == "rate_limited"
        if rule is not None and rule.rate_signal is not None:
            rate_signal = rule.rate_signal
        return Classification(outcome, category, reported_status(reply.enhanced, outcome), rate_signal,
                              rule=rule.name if rule else None)

    def classify_failure(self, kind: FailureKind, detail: str, permanent: bool = False,
                         enhanced: str | None = None) -> Classification:
        """Classify a failure that produced no SMTP reply.

        ``detail`` is the human description for the caller's log and the DSN; it does not change the
        category. ``enhanced`` (for example the ``.enhanced`` of a DNS error, ``5.1.10`` for a null MX)
        replaces the default status detail; its class always follows ``permanent``.
        """
        category, temporary_detail, permanent_detail = _FAILURES.get(kind, ("other", "0.0", "0.0"))
        outcome: Outcome = "permanent" if permanent else "temporary"
        status = f"{_OUTCOME_CLASS[outcome]}.{permanent_detail if permanent else temporary_detail}"
        given = _ENHANCED_AT_START.match(enhanced.strip()) if enhanced is not None else None
        if given is not None:
            status = reported_status(_normalise_enhanced(*given.groups()), outcome)
        if permanent and status[1:] in _BAD_DOMAIN_DETAILS:
            # NXDOMAIN (X.1.2) and null MX (X.1.10) say the domain takes no mail: the same category a
            # remote "domain not found" reply gets, so suppression treats both alike.
            category = "bad_domain"
        return Classification(outcome, category, status, rule=f"failure:{kind}")

    def _first_match(self, reply: Reply) -> BounceRule | None:
        for rule in self._rules:
            if rule.matches(reply):
                return rule
        return None


_BAD_DOMAIN_DETAILS = frozenset({".1.2", ".1.10"})


def outcome_of(reply: Reply) -> Outcome | None:
    """The outcome by code class, the enhanced class deciding between 4 and 5; None: not a final reply."""
    code_class = reply.code // 100
    if code_class == 2:
        return "delivered"
    if code_class not in (4, 5):
        return None
    enhanced_class = reply.enhanced[0] if reply.enhanced else ""
    if enhanced_class == "4":
        return "temporary"
    if enhanced_class == "5":
        return "permanent"
    return "temporary" if code_class == 4 else "permanent"


def reported_status(enhanced: str | None, outcome: Outcome) -> str:
    """The status to report: the reply's enhanced code with the outcome's class, else ``N.0.0``."""
    cls_digit = _OUTCOME_CLASS[outcome]
    if enhanced is None:
        return f"{cls_digit}.0.0"
    _, _, rest = enhanced.partition(".")
    return f"{cls_digit}.{rest}"


__all__ = [
    "BounceClassifier",
    "BounceRule",
    "Classification",
    "FailureKind",
    "Outcome",
    "Reply",
    "clean_reply_text",
    "outcome_of",
    "parse_rule",
    "parse_rules",
    "reported_status",
    "shipped_rules",
]

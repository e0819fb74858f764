"""English descriptions of one scan's descriptor z-scores, and the parser that reads them back.

Design
------
* One sentence per named descriptor of :data:`fmrilm.descriptors.common.DESCRIPTORS`, in catalogue order,
  grouped into one paragraph per domain (fc, fg, ica, graph). Network- and pair-level descriptors are
  summarised: the deviating networks (pairs) are named, grouped by level and direction, most deviant first
  and at most ``max_network_sentences`` of them; the rest are said to be typical (or counted when more
  deviate than are named). Ranked descriptors list the ``top_k`` most elevated / reduced fc pairs.
* Wording comes from the template tables below (at least five per sentence type). The template is drawn by
  an RNG seeded with ``(seed, descriptor name)``, so the same seed gives identical text and the wording of a
  sentence does not depend on which other descriptors are present.
* Facts are always written in one small grammar, whatever the template: a level adverb (``markedly`` /
  ``somewhat``) followed by a direction word, network names (readable Yeo names or the raw one-word name),
  ``(z = 2.31)`` after each named item, ``typical``, ``unavailable``. :func:`parse` identifies a sentence's
  descriptor by its catalogue phrase (longest match) and reads that grammar, so it ignores sentence order,
  tolerates missing sentences and also reads rewordings that keep the grammar; :func:`accept_rewrite` uses
  it to reject rewordings that change a fact.
"""

from __future__ import annotations

import json
import math
import numbers
import random
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pandas as pd

from fmrilm.descriptors.common import DESCRIPTORS, DOMAINS, MEASURE_SUFFIXES
from fmrilm.errors import FmrilmError

READABLE = {"Vis": "visual", "SomMot": "somatomotor", "DorsAttn": "dorsal attention",
            "SalVentAttn": "salience/ventral attention", "Limbic": "limbic", "Cont": "frontoparietal control",
            "Default": "default mode", "Subcortical": "subcortical"}
_RAW = {v: k for k, v in READABLE.items()}
# Words a raw (unknown) network name may not be: the parser would confuse them with the template grammar.
_RESERVED = {"and", "the", "in", "for", "within", "between", "network", "networks", "typical", "unavailable", *MEASURE_SUFFIXES,
             "every", "all", "other", "others", "rest", "remaining", "pair", "pairs"}
_CONNECTIVITY = {"network_pair_connectivity", "mean_connectivity", "network_fnc"}  # "stronger/weaker" reads better

# (template, vocabulary index). {p} phrase, {body} the grouped deviations or "typical in every network",
# {tail} "; the remaining networks are typical" etc. Vocabularies are (up, down) word pairs.
VOCAB = (("higher", "lower"), ("elevated", "reduced"), ("increased", "decreased"))
NETWORK_TEMPLATES = (
    ("The {p} is {body}{tail}.", 0),
    ("In this scan, the {p} is {body}{tail}.", 1),
    ("This scan's {p} is {body}{tail}.", 2),
    ("Relative to the reference cohort, the {p} is {body}{tail}.", 0),
    ("The {p} of this scan is {body}{tail}.", 1),
    ("The {p} is {body} compared with the reference cohort{tail}.", 0),
)
PAIR_TEMPLATES = (
    ("Relative to the reference cohort, {p} is {body}{tail}.", 0),
    ("In this scan, {p} is {body}{tail}.", 1),
    ("The {p} of this scan is {body}{tail}.", 2),
    ("This scan's {p} is {body}{tail}.", 0),
    ("Pairwise {p} is {body}{tail}.", 1),
    ("{p} is {body} compared with the reference cohort{tail}.", 2),
)
RANKED_TEMPLATES = (
    "The {p} is {items}.",
    "Relative to the reference cohort, the {p} is {items}.",
    "The {p} is found {items}.",
    "Ranked against the reference cohort, the {p} lies {items}.",
    "In this scan, the {p} is {items}.",
)
RANKED_NONE = (  # {adj} "elevated" / "reduced": no pair lies on that side of the reference mean
    "No network pair shows {adj} connectivity relative to the reference cohort.",
    "None of the network pairs has {adj} connectivity.",
    "Connectivity is not {adj} for any network pair.",
    "Relative to the reference cohort, no pair of networks shows {adj} connectivity.",
    "There is no network pair with {adj} connectivity in this scan.",
)
GLOBAL_TEMPLATES = (  # {state} "markedly higher" / "typical"; {z} " (z = 2.50; value 0.52)" or ""
    ("Relative to the reference cohort, the {p} is {state}{z}.", 0),
    ("The {p} is {state}{z}.", 1),
    ("This scan shows a {state} {p}{z}.", 0),
    ("In this scan, the {p} is {state}{z}.", 2),
    ("This scan's {p} is {state}{z}.", 0),
    ("The {p} is {state} compared with the reference cohort{z}.", 1),
)
GLOBAL_UNAVAILABLE = (
    "The {p} is unavailable for this scan.",
    "For this scan, the {p} is unavailable.",
    "The {p} of this scan is unavailable, so it cannot be compared with the reference cohort.",
    "A comparison of the {p} with the reference cohort is unavailable for this scan.",
    "This scan has no usable {p}, so its comparison with the reference cohort is unavailable.",
)
ALL_TYPICAL = ("typical in every {a}{noun}", "typical in all {a}{noun}s", "typical across all {a}{noun}s")
REST_TYPICAL = ("the rest are typical", "others are typical", "all other {noun}s are typical",
                "the remaining {noun}s are typical", "every other {noun} is typical")

# Parser grammar. A name is a readable network name or one raw token (see _check_name).
_UP = ("higher", "elevated", "increased", "stronger", "above")
_DOWN = ("lower", "reduced", "decreased", "weaker", "below")
_NUM = r"[-+\u2212]?\d+(?:\.\d+)?"
_NAME = "(?:" + "|".join(re.escape(n) for n in sorted(_RAW, key=len, reverse=True)) + r"|(?<![\w/+-])[A-Za-z0-9_+-]+)"
_ZP = rf"\(\s*z\s*=\s*(?P<z>{_NUM})[^)]*\)"
_LD = rf"\b(?P<lv>markedly|somewhat)\s+(?P<dir>{'|'.join(_UP + _DOWN)})\b"
_NET_SCAN = re.compile(rf"{_LD}|(?P<net>{_NAME})(?:\s+networks?)?\s*{_ZP}", re.I)
_PAIR_SCAN = re.compile(
    rf"{_LD}|(?P<na>\bunavailable\b)|(?:\bbetween\s+(?:the\s+)?(?P<a>{_NAME})\s+and\s+(?:the\s+)?(?P<b>{_NAME})"
    rf"|\bwithin\s+(?:the\s+)?(?P<w>{_NAME}))(?:\s+networks?)?(?:\s*{_ZP})?", re.I)
_NA = re.compile(r"\bunavailable\b|\bnot available\b|could not be computed", re.I)
_NA_ALL = re.compile(r"\bunavailable (?:for|in) every\b", re.I)
_NA_LIST = re.compile(r"\bunavailable (?:for|in) (?:the )?(?P<list>.+?)\s+networks?\b", re.I)
_REST = re.compile(r"\b(?:the rest|others|all other|the remaining|every other)\b[^;]*?\btypical\b", re.I)
_ALL = re.compile(r"\btypical (?:in|across|for) (?:every|all)\b", re.I)
_FURTHER = re.compile(r"\b\d+ further\b", re.I)
_GLOBAL_Z = re.compile(rf"\bz\s*=\s*({_NUM})")
_TYPICAL = re.compile(r"\btypical\b", re.I)
_PHRASES = sorted(DESCRIPTORS, key=lambda d: len(d["phrase"]), reverse=True)  # longest first: "overall ..." wins
_GLOBAL_COLUMNS = {d["columns"] for d in DESCRIPTORS if d["kind"] == "global"}


@dataclass(frozen=True)
class TextConfig:
    """How z-scores become words.

    Attributes
    ----------
    markedly, somewhat : float
        ``|z| > markedly`` is "markedly", ``somewhat < |z| <= markedly`` "somewhat", else "typical".
    top_k : int
        Pairs named by each ranked (most elevated / most reduced connectivity) sentence.
    decimals : int
        Decimals of every printed z.
    max_network_sentences : int
        At most this many deviating networks (or pairs) are named, with their z, in one network- or
        pair-level sentence, most deviant first; further deviating ones are only counted (keeps texts short).
    """

    markedly: float = 2.0
    somewhat: float = 1.0
    top_k: int = 3
    decimals: int = 2
    max_network_sentences: int = 3

    def __post_init__(self) -> None:
        for name, low, high in (("top_k", 1, 10**6), ("decimals", 0, 6), ("max_network_sentences", 1, 10**6)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise FmrilmError(f"TextConfig {name}={value!r}: use a whole number from {low} to {high}")
        if not (math.isfinite(self.somewhat) and math.isfinite(self.markedly) and 0 <= self.somewhat < self.markedly):
            raise FmrilmError(f"TextConfig somewhat={self.somewhat}, markedly={self.markedly}: need 0 <= somewhat < markedly")


DEFAULT_CONFIG = TextConfig()


def level(z: float, config: TextConfig = DEFAULT_CONFIG) -> tuple[str, str | None]:
    """Level and direction of one z-score.

    Returns
    -------
    (level, direction): level "markedly" / "somewhat" / "typical" / "unavailable" (NaN or infinite z),
    direction "higher" / "lower", None for typical and unavailable.
    """
    z = float(z)
    if not math.isfinite(z):
        return "unavailable", None
    size = "markedly" if abs(z) > config.markedly else "somewhat" if abs(z) > config.somewhat else "typical"
    return size, (None if size == "typical" else "higher" if z > 0 else "lower")


def _display(net: str) -> str:
    return READABLE.get(net, net)


def _check_name(net: str, column: str) -> None:
    """Raw names must be one token that cannot be read as a readable name or a grammar word."""
    if net in READABLE:
        return
    if not re.fullmatch(r"[A-Za-z0-9_+-]+", net) or net.lower() in _RAW or net.lower() in _RESERVED:
        raise FmrilmError(f"column {column!r}: network name {net!r} cannot be written unambiguously; "
                          "use one word of letters, digits, '_', '+' or '-' that is not a Yeo readable name")


def _members(d: dict, column: str) -> tuple[str, ...] | None:
    """The networks ``column`` belongs to under descriptor ``d`` (() for a global one), else None."""
    if d["kind"] == "global":
        return () if column == d["columns"] else None
    if not column.startswith(d["columns"] + ".") or column in _GLOBAL_COLUMNS:
        return None
    parts = tuple(column[len(d["columns"]) + 1:].split("."))
    if parts[-1] in MEASURE_SUFFIXES:  # fg.g1.variance is a measure of G1, not a network called "variance"
        return None
    return parts if len(parts) == (1 if d["kind"] == "network" else 2) else None


def _as_float(value: object, column: str) -> float:
    if value is None or (not isinstance(value, (str, bytes)) and pd.isna(value) is True):  # None, NaN, pd.NA, NaT
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise FmrilmError(f"descriptor {column!r} = {value!r} is not a number; use a float or NaN") from None


def _classify(z: Mapping[str, object]) -> dict[str, dict[tuple[str, ...], float]]:
    """{descriptor name: {networks: z}} for every descriptor column in ``z`` (other keys are ignored)."""
    groups: dict[str, dict[tuple[str, ...], float]] = {}
    for column, value in z.items():
        for d in DESCRIPTORS:
            members = _members(d, str(column)) if d["kind"] != "ranked" else None
            if members is not None:
                for net in members:
                    _check_name(net, str(column))
                groups.setdefault(d["name"], {})[members] = _as_float(value, str(column))
    return groups


def _fmt(z: float, config: TextConfig) -> str:
    return f"{z:.{config.decimals}f}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _words(d: dict, vocab: int) -> tuple[str, str]:
    up, down = VOCAB[vocab]
    return ("stronger", "weaker") if d["name"] in _CONNECTIVITY and vocab == 0 else (up, down)


def _pair_item(pair: tuple[str, ...], z: float | None, config: TextConfig) -> str:
    number = "" if z is None else f" (z = {_fmt(z, config)})"
    if pair[0] == pair[1]:
        return f"within {_display(pair[0])}{number}"
    return f"between {_display(pair[0])} and {_display(pair[1])}{number}"


def _group(d: dict, words: str, items: list[tuple[tuple[str, ...], float]], config: TextConfig) -> str:
    """One level/direction group, e.g. 'somewhat lower in the default mode (z = -1.42) and limbic (z = -1.10) networks'."""
    if d["kind"] == "pair":
        return f"{words} " + _join([_pair_item(k, z, config) for k, z in items])
    if len(items) == 1:
        return f"{words} in the {_display(items[0][0][0])} network (z = {_fmt(items[0][1], config)})"
    return f"{words} in the " + _join([f"{_display(k[0])} (z = {_fmt(z, config)})" for k, z in items]) + " networks"


def _summary(d: dict, values: dict[tuple[str, ...], float], rng: random.Random, config: TextConfig) -> str:
    """The sentence of a network- or pair-level descriptor: named deviations, then what the rest are."""
    template, vocab = rng.choice(NETWORK_TEMPLATES if d["kind"] == "network" else PAIR_TEMPLATES)
    finite = {k: z for k, z in values.items() if math.isfinite(z)}
    missing = [k for k in values if k not in finite]
    deviating = sorted((k for k, z in finite.items() if level(z, config)[0] != "typical"), key=lambda k: -abs(finite[k]))
    named = deviating[: config.max_network_sentences]
    groups = _groups(d, {k: finite[k] for k in named}, _words(d, vocab), config)
    noun = "network" if d["kind"] == "network" else "network pair"
    if groups:
        body = groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + ", and " + groups[-1]
    elif finite:
        body = rng.choice(ALL_TYPICAL).format(a="available " if missing else "", noun=noun)
    else:
        body = f"unavailable for every {noun}"
    short, extra, rest = noun.split()[-1], len(deviating) - len(named), len(finite) - len(deviating)
    tail = [f"{extra} further {short}{'s deviate' if extra > 1 else ' deviates'} less strongly"] if extra else []
    if groups and rest:  # "the rest" after a count: the parser must not read it as naming every other network
        tail.append("the rest are typical" if extra else rng.choice(REST_TYPICAL).format(noun=short))
    if missing and finite:
        tail.append(_unavailable(d, missing, config))
    return template.format(p=d["phrase"], body=body, tail="".join("; " + t for t in tail))


def _groups(d: dict, named: dict[tuple[str, ...], float], words: tuple[str, str], config: TextConfig) -> list[str]:
    """Named items grouped markedly up, markedly down, somewhat up, somewhat down (empty groups dropped)."""
    groups = []
    for size in ("markedly", "somewhat"):
        for sign, word in zip((1, -1), words):
            items = [(k, z) for k, z in named.items() if level(z, config)[0] == size and z * sign > 0]
            if items:
                groups.append(_group(d, f"{size} {word}", items, config))
    return groups


def _unavailable(d: dict, missing: list[tuple[str, ...]], config: TextConfig) -> str:
    if d["kind"] == "pair":
        return "it is unavailable " + _join([_pair_item(k, None, config) for k in missing])
    names = [_display(k[0]) for k in missing]
    return "it is unavailable for the " + _join(names) + (" networks" if len(names) > 1 else " network")


def _ranked(d: dict, pairs: dict[tuple[str, ...], float], rng: random.Random, config: TextConfig) -> str:
    """The most elevated (or reduced) fc pairs, those on the right side of zero only."""
    sign = 1 if d["name"] == "top_connectivity" else -1
    if not any(math.isfinite(z) for z in pairs.values()):
        return f"The {d['phrase']} is unavailable for this scan."
    chosen = sorted((k for k, z in pairs.items() if math.isfinite(z) and z * sign > 0), key=lambda k: -sign * pairs[k])
    if not chosen:
        return rng.choice(RANKED_NONE).format(adj="elevated" if sign > 0 else "reduced")
    items = [_pair_item(k, pairs[k], config) for k in chosen[: config.top_k]]
    return rng.choice(RANKED_TEMPLATES).format(p=d["phrase"], items=_join(items))


def _global(d: dict, z: float, raw: float | None, rng: random.Random, config: TextConfig) -> str:
    size, direction = level(z, config)
    if size == "unavailable":
        return rng.choice(GLOBAL_UNAVAILABLE).format(p=d["phrase"])
    template, vocab = rng.choice(GLOBAL_TEMPLATES)
    up, down = _words(d, vocab)
    state = "typical" if size == "typical" else f"{size} {up if direction == 'higher' else down}"
    numbers = [] if size == "typical" else [f"z = {_fmt(z, config)}"]
    if numbers and raw is not None and math.isfinite(raw):  # raw values only where they matter: keeps text short
        numbers.append(f"value {float(f'{raw:.3g}'):g}")  # 3 significant digits, no exponent for usual sizes
    return template.format(p=d["phrase"], state=state, z=f" ({'; '.join(numbers)})" if numbers else "")


def sentences(z: Mapping[str, object], raw: Mapping[str, object] | None = None, seed: int = 0,
              config: TextConfig = DEFAULT_CONFIG) -> dict[str, str]:
    """One sentence per descriptor present in ``z``, keyed by descriptor name, in catalogue order.

    Parameters
    ----------
    z : mapping column -> z-score (NaN/None for unavailable); keys that are no descriptor column are ignored.
    raw : mapping column -> raw value; printed next to the z of a deviating global descriptor.
    seed : int
        Chooses the wording; the same seed gives the same text.
    config : TextConfig
    """
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):  # numpy integers are fine
        raise FmrilmError(f"seed={seed!r}: use an integer")
    groups, raw = _classify(z), raw or {}
    out = {}
    for d in DESCRIPTORS:
        values = groups.get("network_pair_connectivity" if d["kind"] == "ranked" else d["name"])
        if not values:
            continue
        rng = random.Random(f"{int(seed)}:{d['name']}")  # str seeds hash with sha512: stable across runs
        if d["kind"] == "global":
            r = raw.get(d["columns"])
            text = _global(d, values[()], None if r is None else _as_float(r, d["columns"]), rng, config)
        else:
            text = _ranked(d, values, rng, config) if d["kind"] == "ranked" else _summary(d, values, rng, config)
        out[d["name"]] = text[0].upper() + text[1:]
    return out


def describe(z: Mapping[str, object], raw: Mapping[str, object] | None = None, seed: int = 0,
             config: TextConfig = DEFAULT_CONFIG) -> dict[str, str]:
    """One paragraph per domain ("fc", "fg", "ica", "graph"; "" when a domain has no columns).

    Parameters are those of :func:`sentences`.
    """
    texts = sentences(z, raw, seed, config)
    return {domain: " ".join(texts[d["name"]] for d in DESCRIPTORS if d["domain"] == domain and d["name"] in texts)
            for domain in DOMAINS}


def paragraph(domains: Mapping[str, str]) -> str:
    """The domain paragraphs joined in the order fc, fg, ica, graph (empty ones skipped)."""
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        raise FmrilmError(f"paragraph: unknown domain {unknown[0]!r}; use {', '.join(DOMAINS)}")
    return " ".join(domains[k].strip() for k in DOMAINS if domains.get(k, "").strip())


# ----------------------------------------------------------------------------------------------- parsing
def _raw_name(name: str) -> str:
    return _RAW.get(re.sub(r"\s+", " ", name.lower()), name)


def _column(d: dict, nets: tuple[str, ...]) -> str:
    prefix = "fc.pair" if d["kind"] == "ranked" else d["columns"]
    return ".".join([prefix, *sorted(nets)])


def _number(text: str) -> float:
    return float(text.replace("\u2212", "-"))


def _read_global(d: dict, sentence: str, config: TextConfig) -> list[tuple[str, tuple, int]]:
    if _NA.search(sentence):
        return [(d["columns"], ("unavailable", None, None), 2)]
    ld, number = re.search(_LD, sentence, re.I), _GLOBAL_Z.search(sentence)
    z = _number(number.group(1)) if number else None
    if ld:
        return [(d["columns"], (ld["lv"].lower(), _direction(ld["dir"]), z), 2)]
    if _TYPICAL.search(sentence):
        return [(d["columns"], ("typical", None, z), 2)]
    return [(d["columns"], (*level(z, config), z), 1)] if z is not None else []


def _direction(word: str) -> str:
    return "higher" if word.lower() in _UP else "lower"


def _scan(d: dict, sentence: str, config: TextConfig) -> list[tuple[str, tuple, int]]:
    """Named items in order; each takes the level of the last level/direction words before it."""
    found, state = [], None
    for m in (_NET_SCAN if d["kind"] == "network" else _PAIR_SCAN).finditer(sentence):
        if m["lv"]:
            state = (m["lv"].lower(), _direction(m["dir"]))
            continue
        if m.groupdict().get("na"):
            state = ("unavailable", None)
            continue
        nets = (m["net"],) if d["kind"] == "network" else (m["w"], m["w"]) if m["w"] else (m["a"], m["b"])
        if any(n.lower() in _RESERVED for n in nets):  # "within the typical range" is no network
            continue
        z = _number(m["z"]) if m["z"] else None
        column = _column(d, tuple(_raw_name(n) for n in nets))
        if state == ("unavailable", None):
            found.append((column, ("unavailable", None, None), 2))
        elif state:
            found.append((column, (*state, z), 2))
        elif z is not None:  # a bare number (ranked sentences): the level follows from the printed value
            found.append((column, (*level(z, config), z), 1))
    if d["kind"] == "network" and (m := _NA_LIST.search(sentence)) and not _NA_ALL.search(sentence):
        for name in re.split(r",\s*(?:and\s+)?|\s+and\s+", m["list"]):
            found.append((_column(d, (_raw_name(re.sub(r"^the\s+", "", name.strip(), flags=re.I)),)), ("unavailable", None, None), 2))
    return found


def _implicit(d: dict, sentence: str, named: set[str], columns: Iterable[str] | None) -> list[tuple[str, tuple, int]]:
    """'the remaining networks are typical' / 'typical in every network' over the caller's column list."""
    if columns is None or d["kind"] == "ranked" or _FURTHER.search(sentence):
        return []
    own = [c for c in columns if _members(d, c) is not None]
    if _NA_ALL.search(sentence):
        return [(c, ("unavailable", None, None), 0) for c in own if c not in named]
    if _REST.search(sentence) or _ALL.search(sentence):
        return [(c, ("typical", None, None), 0) for c in own if c not in named]
    return []


def parse(text: str, columns: Iterable[str] | None = None,
          config: TextConfig = DEFAULT_CONFIG) -> dict[str, tuple[str, str | None, float | None]]:
    """Read the facts a description states back into {column: (level, direction, z)}.

    Parameters
    ----------
    text : str
        Any text made by :func:`describe` (any template, any order, sentences may be missing or extra).
    columns : iterable of str, optional
        The descriptor columns the text is about; with them, "the remaining networks are typical" and
        "typical in every network" are expanded to the columns not named otherwise. Without them only
        explicitly named columns are returned.
    config : TextConfig
        Thresholds that give the level of a z printed without level words (ranked sentences).

    Returns
    -------
    dict column -> (level, direction, z); z is None where no number is stated ("typical" mentions).
    """
    columns = None if columns is None else list(columns)
    best: dict[str, tuple[int, tuple]] = {}
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        low = sentence.lower()
        d = next((d for d in _PHRASES if re.search(rf"(?<![\w-]){re.escape(d['phrase'])}(?![\w-])", low)), None)
        if d is None:
            continue
        found = _read_global(d, sentence, config) if d["kind"] == "global" else _scan(d, sentence, config)
        found += _implicit(d, sentence, {c for c, _, _ in found}, columns)
        for column, value, strength in found:  # words beat bare numbers beat "the rest"; keep any number
            old = best.get(column)
            if old is None or strength > old[0]:
                z = value[2] if value[2] is not None or old is None else old[1][2]
                best[column] = (strength, (*value[:2], z))
            elif old[1][2] is None and value[2] is not None:
                best[column] = (old[0], (*old[1][:2], value[2]))
    return {c: v for c, (_, v) in best.items()}


# ---------------------------------------------------------------------------------------------- rewording
REWORD_PROMPT = ("Rewrite the following description of a brain scan in varied, fluent English. Keep every "
                 "sentence's facts: the measure names, network names, the words 'markedly', 'somewhat', "
                 "'typical' and 'unavailable', the direction words, and every '(z = ...)' exactly as written.")


def accept_rewrite(original: str, rewritten: str, columns: Iterable[str] | None = None) -> bool:
    """True when ``rewritten`` states exactly the facts of ``original`` (same columns, levels, directions, z)."""
    columns = None if columns is None else list(columns)
    facts = parse(original, columns)
    return bool(facts) and facts == parse(rewritten, columns)


def reword(text: str, endpoint: str | None = None, *, model: str | None = None, api_key: str | None = None,
           timeout: float = 60.0, temperature: float = 0.7) -> str:
    """Optionally paraphrase ``text`` with an OpenAI-compatible chat-completion server.

    Off by default (``endpoint=None`` returns ``text``). The rewrite is returned only when
    :func:`accept_rewrite` finds the same facts in it; otherwise the original comes back unchanged.

    Parameters
    ----------
    endpoint : str, optional
        Server base URL (``http://host:8000/v1``) or the full ``.../chat/completions`` URL.
    model, api_key : str, optional
        Sent as the ``model`` field and as a bearer token when given.
    timeout, temperature : float
    """
    if endpoint is None:
        return text
    if not endpoint.startswith(("http://", "https://")):
        raise FmrilmError(f"reword endpoint {endpoint!r}: use an http:// or https:// URL")
    url = endpoint.rstrip("/")
    url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    payload = {"messages": [{"role": "system", "content": REWORD_PROMPT}, {"role": "user", "content": text}],
               "temperature": temperature, **({"model": model} if model else {})}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            rewritten = json.load(response)["choices"][0]["message"]["content"].strip()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise FmrilmError(f"reword endpoint {url}: request failed ({exc})") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise FmrilmError(f"reword endpoint {url}: reply is not a chat completion (no choices[0].message.content)") from None
    return rewritten if accept_rewrite(text, rewritten) else text

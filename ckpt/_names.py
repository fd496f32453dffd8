"""Tensor names: how a leaf's key path becomes a safetensors tensor name, both ways.

One owner for the rules that export (`ckpt._export`) and import (`ckpt._safetensors`) share,
so that a model exported and imported with the same rules lands on the same leaves.

The default name joins the key path's entries with ``.`` (``['params']['layers'][0]['w']``
is ``params.layers.0.w``), leaving out a last ``.value`` attribute (what a Flax NNX
``Variable`` adds). Then the rules run in order on that name:

- ``drop REGEX``: a name REGEX matches (``re.search``) is left out;
- ``keep REGEX``: a name REGEX matches is kept again (undoes an earlier ``drop``);
- ``REGEX => REPLACEMENT``: ``re.sub`` on the name (``\\1`` for groups).

`DEFAULT_RULES` come first: optimizer state and RNG state are dropped (neither belongs in
deployed weights); ``keep`` rules bring them back. Typed PRNG key arrays and values that are
not arrays are never tensors.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from ckpt._tree import KeyPath
from ckpt.errors import InvalidArgumentError

DEFAULT_RULES = (
    r"drop (^|\.)(opt_state|optimizer|optimizer_state|opt)(\.|$)",
    r"drop (^|\.)rngs(\.|$)",
)

# Rule lines; or a mapping of REGEX to REPLACEMENT (None: drop what REGEX matches).
NamesLike = str | Iterable[str] | Mapping[str, str | None] | None


@dataclasses.dataclass(frozen=True)
class _Rule:
    text: str
    action: str                 # "drop", "keep" or "rename"
    pattern: re.Pattern[str]
    replacement: str = ""


def _parse(text: str) -> _Rule:
    line = text.strip()
    try:
        for action in ("drop", "keep"):
            if line.startswith(action + " "):
                return _Rule(text, action, re.compile(line[len(action):].strip()))
        if "=>" in line:
            pattern, _, replacement = line.partition("=>")
            rule = _Rule(text, "rename", re.compile(pattern.strip()), replacement.strip())
            rule.pattern.sub(rule.replacement, "")  # a bad group reference fails here
            return rule
    except re.error as exc:
        raise InvalidArgumentError(f"name rule {text!r}: {exc}") from None
    raise InvalidArgumentError(f"name rule {text!r} is none of 'drop REGEX', 'keep REGEX', "
                               "'REGEX => REPLACEMENT'")


def default_name(path: KeyPath) -> str:
    """The dot-joined name of a key path, without a last ``.value`` attribute."""
    if len(path) > 1 and path[-1] == ("attr", "value"):
        path = path[:-1]
    return ".".join(str(value) for _, value in path)


class NameRules:
    """The rules that name tensors, parsed once.

    Args:
        rules: rule lines after `DEFAULT_RULES` (a str is one rule per line; blank lines and
            lines starting with ``#`` are skipped), or ``{REGEX: REPLACEMENT}`` (a None
            replacement drops what REGEX matches), applied in the mapping's order.
        only: keep only tensors whose final name this regex matches (``re.search``).

    Raises:
        ValueError: a rule or ``only`` that does not parse (names it).
    """

    def __init__(self, rules: NamesLike = None, only: str | None = None) -> None:
        if isinstance(rules, str):
            rules = rules.splitlines()
        elif isinstance(rules, Mapping):
            rules = [f"drop {k}" if v is None else f"{k} => {v}" for k, v in rules.items()]
        lines = [r for r in (*DEFAULT_RULES, *(rules or ()))
                 if r.strip() and not r.strip().startswith("#")]
        self.rules = [_parse(r) for r in lines]
        try:
            self.only = re.compile(only) if only is not None else None
        except re.error as exc:
            raise InvalidArgumentError(f"--only {only!r}: {exc}") from None

    def name(self, path: KeyPath) -> str | None:
        """The tensor name of the leaf at ``path``, or None when the rules leave it out."""
        return self.apply(default_name(path))

    def apply(self, name: str, *, rename: bool = True) -> str | None:
        """``name`` through the rules (without ``rename``, the ``drop``/``keep`` rules and
        ``only`` alone), or None when they leave it out."""
        return self._decide(name, rename)[0]

    def left_out_by(self, path: KeyPath) -> str:
        """Which rule leaves the leaf at ``path`` out (``drop REGEX``, or ``only REGEX``);
        "" when it is kept."""
        return self._decide(default_name(path), True)[1]

    def _decide(self, name: str, rename: bool) -> tuple[str | None, str]:
        decided_by = ""
        for rule in self.rules:
            if rule.action == "rename":
                if rename:
                    name = rule.pattern.sub(rule.replacement, name)
            elif rule.pattern.search(name):
                decided_by = rule.text if rule.action == "drop" else ""
        if decided_by:
            return None, decided_by
        if self.only is not None and not self.only.search(name):
            return None, f"only {self.only.pattern}"
        return name, ""

    def ignores(self, tensor: str) -> bool:
        """Whether a tensor of a file being imported is meant to be left out: the ``drop``
        and ``keep`` rules (and ``only``), matched against its name as stored."""
        return self.apply(tensor, rename=False) is None

def rules_from(names: NamesLike | NameRules, only: str | None = None) -> NameRules:
    """``names`` as `NameRules` (one already parsed is returned as it is)."""
    if isinstance(names, NameRules):
        return names
    return NameRules(names, only)


"""The layer-sequence spec grammar: one parser from a string, list or mapping to block names.

Forms (all expand to a flat list of registered block names):

* names separated by spaces or commas: ``"mlstm mlstm slstm"``
* repetition of a name or a group: ``"mlstm*7 slstm"``, ``"(mlstm*3 slstm)*2"``,
  ``"(attention swiglu)*4"``
* xLSTM ratios (the paper's xLSTM[a:b]): ``"xlstm(7:1)"`` is seven mLSTM blocks then one sLSTM;
  ``"xlstm(7:1, depth=16)"`` repeats the 7:1 group to 16 blocks (sLSTM at positions 7 and 15);
  ``"xlstm(depth=8, slstm_at=[1,5])"`` places sLSTM blocks by position, 0-indexed, as xLSTM's
  ``slstm_at``. ``mlstm=NAME`` / ``slstm=NAME`` swap the two block types, e.g.
  ``"xlstm(3:1, slstm=attention)"`` puts attention where the sLSTM blocks would go.
* in YAML, a list whose items are any of the above (``[mlstm, mlstm, slstm]``), or a mapping
  ``{num_blocks: 8, slstm_at: [7]}`` / ``{ratio: "7:1", depth: 16}`` with the same options.

Grammar::

    seq   := item ((' ' | ',') item)*
    item  := atom ('*' INT)?
    atom  := NAME | '(' seq ')' | 'xlstm' '(' args ')'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mad_search.errors import UserError

__all__ = ["SpecError", "parse", "format_layers", "xlstm_layers"]

MAX_LAYERS = 1024
_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)|(?P<int>\d+)|(?P<op>[()\[\]*:=,]))")


class SpecError(UserError):
    """A layer spec that cannot be parsed or names an unknown block (a user error)."""


@dataclass
class _Tok:
    kind: str  # name | int | op | end
    text: str
    col: int  # 1-based column in the spec string


def _tokenize(text: str) -> list[_Tok]:
    toks, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            bad = text[pos:].lstrip()[0]
            col = pos + (len(text[pos:]) - len(text[pos:].lstrip())) + 1
            raise _Err(f"unexpected character {bad!r}", col)
        kind = m.lastgroup
        toks.append(_Tok(kind, m.group(kind), m.start(kind) + 1))
        pos = m.end()
    toks.append(_Tok("end", "", len(text) + 1))
    return toks


class _Err(Exception):
    def __init__(self, msg: str, col: int | None = None):
        super().__init__(msg)
        self.msg, self.col = msg, col


class _Parser:
    def __init__(self, text: str, valid: Sequence[str] | None):
        self.text, self.valid = text, valid
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self, kind: str | None = None, text: str | None = None) -> _Tok:
        tok = self.peek()
        if (kind and tok.kind != kind) or (text and tok.text != text):
            want = (
                repr(text) if text else {"name": "a block name", "int": "a number"}.get(kind, kind)
            )
            got = "end of spec" if tok.kind == "end" else repr(tok.text)
            raise _Err(f"expected {want}, got {got}", tok.col)
        self.i += 1
        return tok

    def parse(self) -> list[str]:
        if self.peek().kind == "end":
            raise _Err("empty spec")
        layers = self.seq()
        tok = self.peek()
        if tok.kind != "end":
            raise _Err(f"unexpected {tok.text!r}", tok.col)
        return layers

    def seq(self) -> list[str]:
        out = self.item()
        while True:
            tok = self.peek()
            if tok.kind == "op" and tok.text == ",":
                self.i += 1
                tok = self.peek()
            if tok.kind == "name" or (tok.kind == "op" and tok.text == "("):
                out += self.item()
            else:
                return out

    def item(self) -> list[str]:
        layers = self.atom()
        if self.peek().text == "*":
            self.i += 1
            tok = self.take("int")
            count = int(tok.text)
            if count <= 0:
                raise _Err(f"repeat count must be positive, got {count}", tok.col)
            if count * len(layers) > MAX_LAYERS:
                raise _Err(f"spec expands to more than {MAX_LAYERS} layers", tok.col)
            layers = layers * count
        return layers

    def atom(self) -> list[str]:
        tok = self.peek()
        if tok.kind == "op" and tok.text == "(":
            self.i += 1
            if self.peek().text == ")":
                raise _Err("empty group '()'", self.peek().col)
            inner = self.seq()
            self.take("op", ")")
            return inner
        name_tok = self.take("name")
        nxt = self.peek()
        if name_tok.text == "xlstm" and nxt.text == "(":
            return self.xlstm_call(name_tok)
        self.check_name(name_tok.text, name_tok.col)
        return [name_tok.text]

    def check_name(self, name: str, col: int | None) -> None:
        if self.valid is not None and name not in self.valid:
            raise _Err(f"unknown block {name!r}; valid blocks: {', '.join(self.valid)}", col)

    def xlstm_call(self, name_tok: _Tok) -> list[str]:
        self.take("op", "(")
        ratio: tuple[int, int] | None = None
        opts: dict[str, object] = {}
        col = name_tok.col
        while self.peek().text != ")":
            tok = self.peek()
            if tok.kind == "int":
                a = int(self.take("int").text)
                self.take("op", ":")
                b = int(self.take("int").text)
                ratio = (a, b)
            else:
                key = self.take("name")
                self.take("op", "=")
                if self.peek().text == "[":
                    self.i += 1
                    values = []
                    while self.peek().text != "]":
                        values.append(int(self.take("int").text))
                        if self.peek().text == ",":
                            self.i += 1
                    self.take("op", "]")
                    opts[key.text] = values
                elif self.peek().kind == "int":
                    opts[key.text] = int(self.take("int").text)
                else:
                    opts[key.text] = self.take("name").text
            if self.peek().text == ",":
                self.i += 1
            elif self.peek().text != ")":
                t = self.peek()
                raise _Err(
                    f"expected ',' or ')' in xlstm(...), got {t.text or 'end of spec'!r}", t.col
                )
        self.take("op", ")")
        try:
            return xlstm_layers(ratio=ratio, valid=self.valid, **opts)
        except SpecError as exc:
            raise _Err(str(exc), col) from None
        except TypeError:
            bad = sorted(set(opts) - {"depth", "slstm_at", "mlstm", "slstm"})
            raise _Err(
                f"xlstm(...) got unknown option(s) {bad}; valid: depth, slstm_at, mlstm, slstm", col
            ) from None


def xlstm_layers(
    ratio: tuple[int, int] | str | None = None,
    depth: int | None = None,
    slstm_at: Iterable[int] | None = None,
    mlstm: str = "mlstm",
    slstm: str = "slstm",
    valid: Sequence[str] | None = None,
) -> list[str]:
    """xLSTM[a:b] stacks: an mLSTM:sLSTM ratio (optionally repeated to ``depth``) or positions."""
    for nm in (mlstm, slstm):
        if valid is not None and nm not in valid:
            raise SpecError(f"unknown block {nm!r}; valid blocks: {', '.join(valid)}")
    if isinstance(ratio, str):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", ratio)
        if not m:
            raise SpecError(f"ratio must look like '7:1', got {ratio!r}")
        ratio = (int(m.group(1)), int(m.group(2)))
    if ratio is not None and slstm_at is not None:
        raise SpecError("give either a ratio or slstm_at, not both")
    if ratio is not None:
        a, b = ratio
        group = a + b
        if a < 0 or b < 0 or group == 0:
            raise SpecError(f"ratio {a}:{b} has no blocks; use e.g. 7:1, 1:0 or 0:1")
        depth = group if depth is None else depth
        if not isinstance(depth, int) or depth <= 0 or depth % group:
            raise SpecError(
                f"depth {depth} must be a positive multiple of {group} for ratio {a}:{b}"
            )
        return ([mlstm] * a + [slstm] * b) * (depth // group)
    if depth is None:
        raise SpecError("xlstm(...) needs a ratio like 7:1 or depth=N with slstm_at=[...]")
    if not isinstance(depth, int) or depth <= 0 or depth > MAX_LAYERS:
        raise SpecError(f"depth must be an integer in 1..{MAX_LAYERS}, got {depth!r}")
    positions = list(slstm_at or [])
    for p in positions:
        if not isinstance(p, int) or not 0 <= p < depth:
            raise SpecError(f"slstm_at position {p!r} out of range; valid: 0..{depth - 1}")
    if len(set(positions)) != len(positions):
        raise SpecError(f"slstm_at has repeated positions: {positions}")
    return [slstm if i in positions else mlstm for i in range(depth)]


def _valid_names(valid: Sequence[str] | None) -> Sequence[str] | None:
    if valid is not None:
        return list(valid)
    import blocks

    return blocks.names()


def parse(spec: object, valid: Sequence[str] | None = None, check: bool = True) -> list[str]:
    """Expand a layer spec (string, list or mapping) into a flat list of block names.

    ``valid`` defaults to every registered block; ``check=False`` skips the name check.
    Raises :class:`SpecError` with one line naming the bad token and the valid block names.
    """
    names = _valid_names(valid) if check else None
    if isinstance(spec, str):
        try:
            return _Parser(spec, names).parse()
        except _Err as err:
            where = f" at column {err.col}" if err.col else ""
            raise SpecError(f"bad layer spec {spec!r}{where}: {err.msg}") from None
    if isinstance(spec, Mapping):
        opts = dict(spec)
        if "num_blocks" in opts:
            opts["depth"] = opts.pop("num_blocks")
        for old, new in (("mlstm_block", "mlstm"), ("slstm_block", "slstm")):
            if old in opts:
                opts[new] = opts.pop(old)
        allowed = {"ratio", "depth", "slstm_at", "mlstm", "slstm"}
        if set(opts) - allowed:
            raise SpecError(
                f"bad layer spec mapping: unknown key(s) {sorted(set(opts) - allowed)}; valid: "
                "num_blocks, slstm_at, ratio, depth, mlstm_block, slstm_block"
            )
        try:
            if "slstm_at" in opts and opts["slstm_at"] is not None:
                opts["slstm_at"] = list(opts["slstm_at"])
            return xlstm_layers(valid=names, **opts)
        except SpecError as exc:
            raise SpecError(f"bad layer spec {dict(spec)}: {exc}") from None
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        if len(spec) == 0:
            raise SpecError("bad layer spec []: a layer list must name at least one block")
        out: list[str] = []
        for i, item in enumerate(spec):
            try:
                out += parse(item, names, check=check)
            except SpecError as exc:
                raise SpecError(f"layer list item {i}: {exc}") from None
        if len(out) > MAX_LAYERS:
            raise SpecError(f"layer spec expands to {len(out)} layers; at most {MAX_LAYERS}")
        return out
    raise SpecError(
        f"a layer spec must be a string, a list or a mapping, got {type(spec).__name__}: {spec!r}"
    )


def format_layers(layers: Sequence[str]) -> str:
    """A compact spec string for a layer list: ``['mlstm']*7 + ['slstm']`` -> ``mlstm*7 slstm``.

    Repeated groups are folded when that shortens the string: ``(mlstm*3 slstm)*2``.
    """
    layers = list(layers)
    n = len(layers)
    for period in range(1, n // 2 + 1):
        if n % period == 0 and layers == layers[:period] * (n // period) and period < n:
            inner = format_layers(layers[:period])
            return (
                f"({inner})*{n // period}"
                if period > 1 and " " in inner
                else f"{inner}*{n // period}"
            )
    parts, i = [], 0
    while i < n:
        j = i
        while j < n and layers[j] == layers[i]:
            j += 1
        parts.append(layers[i] if j - i == 1 else f"{layers[i]}*{j - i}")
        i = j
    return " ".join(parts)

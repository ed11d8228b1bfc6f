"""Search spaces declared in YAML (``conf/sweep/*.yaml``), turned into ``trial.suggest_*`` calls.

A sweep's ``search`` section::

    search:
      pattern:                       # a pattern generator -> model.pattern
        kind: xlstm                  # xlstm | positions | insert | choice
        ratio: ["1:0", "7:1", "3:1", "1:1", "0:1"]
        depth: [4, 8]                # total blocks; a ratio uses the depths its a+b group divides
        placement: [last, first]     # where the sLSTM blocks sit inside each a+b group
      params:                        # any other config key
        train.lr: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}
        model.d_model: {type: categorical, choices: [32, 64]}
        train.batch_size: {type: int, low: 16, high: 64, step: 16}
      reference:                     # enqueued first, so every study contains them
        - "xlstm(7:1)"               # a spec string (outside the space is fine)
        - {pattern.ratio: "1:0", pattern.depth.1-0: 4}   # or fixed parameter values
        - {spec: "(attention swiglu)*2", train.lr: 3.0e-3}  # a spec with fixed values: a
                                     # search.params key is fixed, any other key set

Pattern generators:

* ``xlstm``: params ``pattern.ratio`` (categorical a:b), then ``pattern.depth.<a>-<b>`` (the
  depths in ``depth`` that a+b divides: a conditional parameter per ratio, so TPE never sees an
  impossible combination) and ``pattern.placement``; ``mlstm`` / ``slstm`` name the two block
  types (defaults mlstm, slstm).
* ``positions``: a fixed ``depth``; one boolean ``pattern.slstm_at.<i>`` per position (xLSTM's
  ``slstm_at``), at least ``min_slstm`` of them set.
* ``insert``: ``depth`` blocks of type ``base`` with ``count`` blocks of type ``block`` inserted,
  the position of each a categorical ``pattern.at.<k>`` (e.g. where attention goes among mLSTMs).
* ``choice``: ``pattern.spec``, a categorical over spec strings.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import optuna

from mad_search.errors import UserError
from mad_search.spec import SpecError, parse, xlstm_layers

PARAM_TYPES = ("float", "int", "categorical")
KINDS = ("xlstm", "positions", "insert", "choice")
PLACEMENTS = ("last", "first", "middle")


class SpaceError(UserError):
    """A search space that cannot be honoured (one-line message)."""


def _group(a: int, b: int, placement: str, mlstm: str, slstm: str) -> list[str]:
    if b == 0 or a == 0:
        return [mlstm] * a + [slstm] * b
    if placement == "first":
        return [slstm] * b + [mlstm] * a
    if placement == "middle":
        half = a // 2
        return [mlstm] * half + [slstm] * b + [mlstm] * (a - half)
    return [mlstm] * a + [slstm] * b


def _ratio(text: Any) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise SpaceError(f"search.pattern.ratio entries look like '7:1', got {text!r}") from None
    if a < 0 or b < 0 or a + b == 0:
        raise SpaceError(f"search.pattern.ratio {text!r} has no blocks; use e.g. 7:1, 1:0, 0:1")
    return a, b


def _depth_key(a: int, b: int) -> str:
    return f"pattern.depth.{a}-{b}"


def _depths(gen: Mapping, a: int, b: int) -> list[int]:
    """The depths of ``gen['depth']`` that an a:b group divides."""
    return [
        d for d in gen.get("depth", [a + b]) if isinstance(d, int) and d > 0 and d % (a + b) == 0
    ]


def pattern_from_params(gen: Mapping, params: Mapping[str, Any]) -> list[str]:
    """The layer list a pattern generator yields for given parameter values."""
    kind = gen.get("kind", "xlstm")
    if kind == "xlstm":
        a, b = _ratio(params["pattern.ratio"])
        group = _group(
            a,
            b,
            params.get("pattern.placement", "last"),
            gen.get("mlstm", "mlstm"),
            gen.get("slstm", "slstm"),
        )
        depth = params.get(_depth_key(a, b))
        if depth is None:
            depth = _depths(gen, a, b)[0]
        return group * (int(depth) // (a + b))
    if kind == "positions":
        depth = int(gen["depth"])
        at = [i for i in range(depth) if params.get(f"pattern.slstm_at.{i}", False)]
        return xlstm_layers(
            depth=depth,
            slstm_at=at,
            mlstm=gen.get("mlstm", "mlstm"),
            slstm=gen.get("slstm", "slstm"),
        )
    if kind == "insert":
        depth, count = int(gen["depth"]), int(gen.get("count", 1))
        layers = [gen.get("base", "mlstm")] * depth
        for k in range(count):
            layers[int(params[f"pattern.at.{k}"])] = gen["block"]
        return layers
    if kind == "choice":
        return parse(params["pattern.spec"], check=False)
    raise SpaceError(f"search.pattern.kind {kind!r} unknown; valid: {', '.join(KINDS)}")


def suggest_pattern(trial: optuna.Trial, gen: Mapping) -> list[str]:
    kind = gen.get("kind", "xlstm")
    p: dict[str, Any] = {}
    if kind == "xlstm":
        p["pattern.ratio"] = trial.suggest_categorical("pattern.ratio", list(gen["ratio"]))
        a, b = _ratio(p["pattern.ratio"])
        depths = _depths(gen, a, b)
        if len(depths) > 1:
            p[_depth_key(a, b)] = trial.suggest_categorical(_depth_key(a, b), depths)
        if a and b and len(gen.get("placement", ["last"])) > 1:
            p["pattern.placement"] = trial.suggest_categorical(
                "pattern.placement", list(gen["placement"])
            )
        else:
            p["pattern.placement"] = list(gen.get("placement", ["last"]))[0]
    elif kind == "positions":
        depth = int(gen["depth"])
        for i in range(depth):
            p[f"pattern.slstm_at.{i}"] = trial.suggest_categorical(
                f"pattern.slstm_at.{i}", [False, True]
            )
        need = int(gen.get("min_slstm", 0))
        if sum(p.values()) < need:  # repair: fill from the end, deterministically
            for i in reversed(range(depth)):
                if sum(p.values()) >= need:
                    break
                p[f"pattern.slstm_at.{i}"] = True
            trial.set_user_attr("pattern_repaired", True)
    elif kind == "insert":
        depth = int(gen["depth"])
        for k in range(int(gen.get("count", 1))):
            p[f"pattern.at.{k}"] = trial.suggest_int(f"pattern.at.{k}", 0, depth - 1)
    elif kind == "choice":
        p["pattern.spec"] = trial.suggest_categorical("pattern.spec", list(gen["choices"]))
    else:
        raise SpaceError(f"search.pattern.kind {kind!r} unknown; valid: {', '.join(KINDS)}")
    return pattern_from_params(gen, p)


def suggest_param(trial: optuna.Trial, key: str, dist: Mapping) -> Any:
    kind = dist.get("type")
    if kind == "float":
        return trial.suggest_float(
            key,
            float(dist["low"]),
            float(dist["high"]),
            log=bool(dist.get("log", False)),
            step=dist.get("step"),
        )
    if kind == "int":
        return trial.suggest_int(
            key,
            int(dist["low"]),
            int(dist["high"]),
            step=int(dist.get("step", 1)),
            log=bool(dist.get("log", False)),
        )
    if kind == "categorical":
        return trial.suggest_categorical(key, list(dist["choices"]))
    raise SpaceError(f"search.params.{key}.type {kind!r} unknown; valid: {', '.join(PARAM_TYPES)}")


def suggest(trial: optuna.Trial, space: Mapping) -> dict[str, Any]:
    """Config overrides for one trial: ``{"model.pattern": [...], "train.lr": ..., ...}``.

    A trial enqueued with a ``reference_pattern`` user attribute uses that spec as its pattern.
    """
    overrides: dict[str, Any] = {}
    ref = trial.user_attrs.get("reference_pattern")
    if ref is not None:
        overrides["model.pattern"] = parse(ref, check=False)
    elif space.get("pattern"):
        overrides["model.pattern"] = suggest_pattern(trial, space["pattern"])
    for key, dist in (space.get("params") or {}).items():
        overrides[key] = suggest_param(trial, key, dist)
    overrides.update(trial.user_attrs.get("reference_overrides") or {})
    return overrides


def reference_spec(ref: str | Mapping, params: Mapping) -> tuple[str, dict, dict]:
    """A spec-string or ``{spec: ..., key: value}`` reference split into its spec, the values
    of searched parameters (fixed by enqueueing) and the other settings (set on that trial's
    config)."""
    if isinstance(ref, str):
        return ref, {}, {}
    rest = {k: v for k, v in ref.items() if k != "spec"}
    fixed = {k: v for k, v in rest.items() if k in params}
    return str(ref["spec"]), fixed, {k: v for k, v in rest.items() if k not in params}


def _check_dist(key: str, dist: Any) -> None:
    if not isinstance(dist, Mapping) or dist.get("type") not in PARAM_TYPES:
        raise SpaceError(
            f"search.params.{key} needs type: one of {', '.join(PARAM_TYPES)} (got {dist!r})"
        )
    if dist["type"] == "categorical":
        if not dist.get("choices"):
            raise SpaceError(f"search.params.{key}: categorical needs a non-empty choices list")
        return
    for b in ("low", "high"):
        if b not in dist:
            raise SpaceError(f"search.params.{key}: {dist['type']} needs low and high")
    if not dist["low"] <= dist["high"]:
        raise SpaceError(f"search.params.{key}: low {dist['low']} is above high {dist['high']}")
    if dist.get("log") and dist["low"] <= 0:
        raise SpaceError(f"search.params.{key}: a log range needs low > 0, got {dist['low']}")


def all_patterns(gen: Mapping, limit: int = 4096) -> list[list[str]]:
    """Every layer list a generator can produce (up to ``limit``), for config-time checks."""
    kind = gen.get("kind", "xlstm")
    if kind == "xlstm":
        for key in ("ratio",):
            if not gen.get(key):
                raise SpaceError("search.pattern (kind xlstm) needs a non-empty ratio list")
        for d in gen.get("depth", []):
            if not isinstance(d, int) or d <= 0:
                raise SpaceError(
                    f"search.pattern.depth entries must be positive integers, got {d!r}"
                )
        out = []
        for ratio, place in itertools.product(gen["ratio"], gen.get("placement", ["last"])):
            if place not in PLACEMENTS:
                raise SpaceError(
                    f"search.pattern.placement {place!r}; valid: {', '.join(PLACEMENTS)}"
                )
            a, b = _ratio(ratio)
            depths = _depths(gen, a, b)
            if not depths:
                raise SpaceError(
                    f"search.pattern: ratio {ratio} fits none of the depths "
                    f"{list(gen.get('depth', []))} (need a multiple of {a + b})"
                )
            for d in depths:
                out.append(
                    pattern_from_params(
                        gen,
                        {"pattern.ratio": ratio, _depth_key(a, b): d, "pattern.placement": place},
                    )
                )
        return out
    if kind == "positions":
        depth = gen.get("depth")
        if not isinstance(depth, int) or not 1 <= depth <= 16:
            raise SpaceError(f"search.pattern.depth (kind positions) must be 1..16, got {depth!r}")
        need = gen.get("min_slstm", 0)
        if not isinstance(need, int) or not 0 <= need <= depth:
            raise SpaceError(f"search.pattern.min_slstm must be in 0..{depth}, got {need!r}")
        return [
            xlstm_layers(
                depth=depth,
                slstm_at=[0],
                mlstm=gen.get("mlstm", "mlstm"),
                slstm=gen.get("slstm", "slstm"),
            )
        ]
    if kind == "insert":
        depth, count = gen.get("depth"), gen.get("count", 1)
        if not isinstance(depth, int) or depth <= 0:
            raise SpaceError(f"search.pattern.depth (kind insert) must be positive, got {depth!r}")
        if not isinstance(count, int) or not 1 <= count <= depth:
            raise SpaceError(f"search.pattern.count must be in 1..{depth}, got {count!r}")
        if not gen.get("block"):
            raise SpaceError("search.pattern (kind insert) needs block: the block type to insert")
        return [[gen.get("base", "mlstm")] * (depth - 1) + [gen["block"]]]
    if kind == "choice":
        if not gen.get("choices"):
            raise SpaceError("search.pattern (kind choice) needs a non-empty choices list")
        return [parse(c, check=False) for c in gen["choices"]]
    raise SpaceError(f"search.pattern.kind {kind!r} unknown; valid: {', '.join(KINDS)}")


def validate(space: Mapping, valid_blocks: list[str]) -> list[list[str]]:
    """Check a search space up front; returns every pattern it can produce (names checked)."""
    if not isinstance(space, Mapping):
        raise SpaceError(
            f"search must be a mapping with pattern / params / reference, got {space!r}"
        )
    unknown = sorted(set(space) - {"pattern", "params", "reference"})
    if unknown:
        raise SpaceError(f"search has unknown key(s) {unknown}; valid: pattern, params, reference")
    patterns: list[list[str]] = []
    if space.get("pattern"):
        try:
            patterns = all_patterns(space["pattern"])
        except SpecError as exc:
            raise SpaceError(f"search.pattern: {exc}") from None
        for layers in patterns:
            for name in layers:
                if name not in valid_blocks:
                    raise SpaceError(
                        f"search.pattern uses unknown block {name!r}; valid blocks: "
                        f"{', '.join(valid_blocks)}"
                    )
    for key, dist in (space.get("params") or {}).items():
        _check_dist(key, dist)
        if key in ("model.pattern", "pattern"):
            raise SpaceError("search.params cannot set model.pattern; use search.pattern")
    for ref in space.get("reference") or []:
        if isinstance(ref, str) or (isinstance(ref, Mapping) and "spec" in ref):
            spec, _, settings = reference_spec(ref, {})
            try:
                patterns.append(parse(spec, valid_blocks))
            except SpecError as exc:
                raise SpaceError(f"search.reference: {exc}") from None
            bad = sorted(k for k in settings if k in ("model.pattern", "pattern"))
            if bad:
                raise SpaceError(f"search.reference {dict(ref)}: use spec, not {bad[0]}")
        elif isinstance(ref, Mapping):
            try:
                patterns.append(pattern_from_params(space.get("pattern") or {}, ref))
            except (KeyError, SpecError) as exc:
                raise SpaceError(f"search.reference {dict(ref)}: missing or bad {exc}") from None
        else:
            raise SpaceError(f"search.reference entries are spec strings or mappings, got {ref!r}")
    return patterns

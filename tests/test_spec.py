"""The layer-sequence grammar: every documented form, and errors that point at the problem."""

import random

import pytest

from mad_search.spec import SpecError, format_layers, parse, xlstm_layers

VALID = ["attention", "mlstm", "slstm", "swiglu"]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("mlstm*7 slstm", ["mlstm"] * 7 + ["slstm"]),
        ("(mlstm*3 slstm)*2", (["mlstm"] * 3 + ["slstm"]) * 2),
        ("(attention swiglu)*4", ["attention", "swiglu"] * 4),
        ("mlstm, slstm,attention", ["mlstm", "slstm", "attention"]),
        ("xlstm(7:1)", ["mlstm"] * 7 + ["slstm"]),
        ("xlstm(1:0)", ["mlstm"]),
        ("xlstm(0:1, depth=3)", ["slstm"] * 3),
        ("xlstm(7:1, depth=16)", (["mlstm"] * 7 + ["slstm"]) * 2),
        ("xlstm(depth=4, slstm_at=[0, 2])", ["slstm", "mlstm", "slstm", "mlstm"]),
        ("xlstm(3:1, slstm=attention)", ["mlstm"] * 3 + ["attention"]),
        ("swiglu xlstm(1:1)*2", ["swiglu"] + ["mlstm", "slstm"] * 2),
        (["mlstm", "mlstm*2", "slstm"], ["mlstm"] * 3 + ["slstm"]),
        ({"num_blocks": 8, "slstm_at": [7]}, ["mlstm"] * 7 + ["slstm"]),
        ({"ratio": "3:1", "depth": 8}, (["mlstm"] * 3 + ["slstm"]) * 2),
        (
            {"num_blocks": 3, "slstm_at": [1], "slstm_block": "attention"},
            ["mlstm", "attention", "mlstm"],
        ),
    ],
)
def test_spec_forms_expand_to_layer_lists(spec, expected):
    assert parse(spec, VALID) == expected


def test_random_layer_lists_round_trip_through_format():
    for _ in range(200):
        layers = [random.choice(VALID) for _ in range(random.randint(1, 12))]
        if random.random() < 0.5:
            layers = layers * random.randint(2, 3)
        text = format_layers(layers)
        assert parse(text, VALID) == layers, text


def test_format_folds_xlstm_ratios():
    assert format_layers(["mlstm"] * 7 + ["slstm"]) == "mlstm*7 slstm"
    assert format_layers((["mlstm"] * 3 + ["slstm"]) * 2) == "(mlstm*3 slstm)*2"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("mlstm*7 slstn", "unknown block 'slstn'"),
        ("mlstm*7 slstn", "column 9"),
        ("mlstm*7 slstn", "valid blocks: attention, mlstm, slstm, swiglu"),
        ("(mlstm slstm", "expected ')'"),
        ("mlstm*0", "repeat count must be positive"),
        ("mlstm*", "expected a number"),
        ("mlstm % slstm", "unexpected character '%'"),
        ("", "empty spec"),
        ("()", "empty group"),
        ("xlstm(0:0)", "has no blocks"),
        ("xlstm(7:1, depth=12)", "multiple of 8"),
        ("xlstm(depth=4, slstm_at=[4])", "out of range; valid: 0..3"),
        ("xlstm(depth=4, slstm_at=[1, 1])", "repeated"),
        ("xlstm(7:1, slstm=foo)", "unknown block 'foo'"),
        ("xlstm(7:1, width=3)", "unknown option"),
        ("xlstm()", "needs a ratio"),
        ([], "at least one block"),
        (["mlstm", "nope"], "layer list item 1"),
        ({"num_blocks": 4, "slstm_at": [9]}, "out of range"),
        ({"blocks": 4}, "unknown key"),
        (42, "must be a string, a list or a mapping"),
    ],
)
def test_bad_specs_fail_with_one_clear_line(spec, fragment):
    with pytest.raises(SpecError) as err:
        parse(spec, VALID)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_parse_uses_the_registry_by_default():
    import blocks

    assert parse("mlstm slstm") == ["mlstm", "slstm"]
    with pytest.raises(SpecError, match=", ".join(blocks.names())):
        parse("transformer_block")


def test_xlstm_layers_positions_match_slstm_at():
    depth = random.randint(2, 24)
    at = sorted(random.sample(range(depth), random.randint(0, depth)))
    layers = xlstm_layers(depth=depth, slstm_at=at)
    assert [i for i, n in enumerate(layers) if n == "slstm"] == at

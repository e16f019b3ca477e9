"""The layer-selection syntax shared by VLLM_MOE_LAYER and ``generate --log-layer``."""

from __future__ import annotations

import pytest

from moeprof.layers import LayerSpecError, format_layers, parse_layers


@pytest.mark.parametrize(
    ("text", "indices"),
    [
        ("12", (12,)),
        (" 0,12,23 ", (0, 12, 23)),
        ("0-3,23", (0, 1, 2, 3, 23)),
        ("5,1-2,2", (1, 2, 5)),
        ("ALL", None),
    ],
)
def test_selections_parse_to_sorted_distinct_layers(text: str, indices: tuple | None) -> None:
    assert parse_layers(text).indices == indices


@pytest.mark.parametrize("text", ["", "x", "-1", "1,,2", "3-1", "1-", "1.5", "all,2"])
def test_malformed_selections_are_refused(text: str) -> None:
    with pytest.raises(LayerSpecError):
        parse_layers(text)


def test_a_selection_prints_back_in_the_syntax_it_was_given_in() -> None:
    assert str(parse_layers("3,0-2,7")) == "0-3,7"
    assert parse_layers(str(parse_layers("3,0-2,7"))) == parse_layers("0-3,7")
    assert str(parse_layers("all")) == "all"


def test_resolving_against_the_model_skips_dense_layers_for_all_only() -> None:
    moe = {1, 2, 3, 5}
    assert parse_layers("all").resolve(moe) == [1, 2, 3, 5]
    assert parse_layers("5,1").resolve(moe) == [1, 5]
    with pytest.raises(
        LayerSpecError, match=r"^0, 4 are not MoE layers of m; its MoE layers are 1-3, 5$"
    ):
        parse_layers("0-5").resolve(moe, "m")
    with pytest.raises(LayerSpecError, match="has no MoE layer"):
        parse_layers("all").resolve(set(), "m")


def test_long_layer_lists_stay_short() -> None:
    assert format_layers(range(60)) == "0-59"
    assert format_layers([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"

import json
from pathlib import Path

import pytest

from modaseg.classes import IGNORE_INDEX, MODANET, LabelSpace, palette

SAMPLE = (
    Path(__file__).parents[1] / ".." / "shared" / "data" / "modanet-sample" / "modanet_train_subset_a.json"
)


def test_modanet_ids_are_label_values_and_background_is_zero():
    assert MODANET.num_classes == 14
    assert MODANET.names[0] == "background"
    assert MODANET.names[1] == "bag"  # the seed system printed background under this name
    assert MODANET.names[13] == "scarf/tie"
    assert all(MODANET.category_to_label[i] == i for i in range(1, 14))
    assert MODANET.name(IGNORE_INDEX) == "ignore"


def test_names_come_from_the_annotation_file():
    if not SAMPLE.is_file():
        pytest.skip(f"real ModaNet sample not present at {SAMPLE}")
    cats = json.loads(SAMPLE.read_text())["categories"]
    assert LabelSpace.from_categories(cats) == MODANET


def test_other_datasets_with_zero_based_ids_map_in_order():
    space = LabelSpace.from_categories([{"id": 0, "name": "shirt"}, {"id": 5, "name": "shoe"}])
    assert space.names == ("background", "shirt", "shoe")
    assert space.category_to_label == {0: 1, 5: 2}
    assert space.to_categories() == [{"id": 0, "name": "shirt"}, {"id": 5, "name": "shoe"}]


@pytest.mark.parametrize(
    ("cats", "message"),
    [([], "no categories"), ([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], "duplicate category ids")],
)
def test_bad_categories(cats, message):
    with pytest.raises(ValueError, match=message):
        LabelSpace.from_categories(cats)


@pytest.mark.parametrize("n", [14, 47])
def test_palette_is_fixed_and_distinct(n):
    colours = palette(n)
    assert len(colours) == n and len(set(colours)) == n
    assert colours[0] == (0, 0, 0)
    assert palette(n) == colours

from dataclasses import dataclass
from typing import Literal

import pytest

from mann.config import ConfigError, check, coerce, flatten, parse_set_args, replace_checked


@dataclass(frozen=True)
class Toy:
    size: int = 8  # memory slots
    lr: float = 1e-3
    kind: Literal["a", "b"] = "a"
    clip: float | None = None
    lengths: tuple[int, ...] = (1, 2)
    flag: bool = False

    def __post_init__(self):
        check(self.size > 0, "size", "a positive integer", self.size)


def test_overrides_are_coerced_from_strings():
    overrides = {"size": "16", "lr": "1e-4", "kind": "b", "clip": "null", "lengths": "[3, 4]", "flag": "true"}
    cfg = replace_checked(Toy(), overrides)
    assert cfg == Toy(size=16, lr=1e-4, kind="b", clip=None, lengths=(3, 4), flag=True)


@pytest.mark.parametrize(
    "overrides, key, expected",
    [
        ({"nope": 1}, "model.nope", "a known key of Toy"),
        ({"size": 2.5}, "model.size", "an integer"),
        ({"size": "x"}, "model.size", "an integer"),
        ({"size": -3}, "model.size", "a positive integer"),
        ({"kind": "c"}, "model.kind", "one of 'a', 'b'"),
        ({"flag": 1}, "model.flag", "true/false"),
        ({"lr": True}, "model.lr", "a number"),
    ],
)
def test_bad_overrides_name_key_and_expectation(overrides, key, expected):
    with pytest.raises(ConfigError) as info:
        replace_checked(Toy(), overrides, prefix="model.")
    assert info.value.key == key
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_error_with_source_is_one_line_naming_file_key_and_expectation():
    err = ConfigError("size", "a positive integer", -3).with_source("study.yaml", "model.")
    assert str(err) == "study.yaml: model.size: expected a positive integer, got -3"


def test_flatten_and_parse_set_args():
    assert flatten({"lr": 1, "model": {"n": 2, "sub": {"x": 3}}}) == {"lr": 1, "model.n": 2, "model.sub.x": 3}
    assert parse_set_args(["lr=1e-3", "model.n = 4"]) == {"lr": "1e-3", "model.n": "4"}
    with pytest.raises(ConfigError):
        parse_set_args(["lr"])


def test_coerce_int_accepts_integral_float_but_not_bool():
    assert coerce(4.0, int, "k") == 4
    with pytest.raises(ConfigError):
        coerce(True, int, "k")

"""--device-group parsing (the command-line behaviour is in test_plugin.py)."""

from __future__ import annotations

import pytest

from pytest_qeff.devices import check_workers, parse_group, parse_groups, worker_group


@pytest.mark.parametrize(
    ("text", "group"),
    [("0", (0,)), ("0,1", (0, 1)), ("[0,1]", (0, 1)), (" [ 2, 3 ] ", (2, 3)), ("[0]", (0,)), ("4,5,6,7", (4, 5, 6, 7))],
)
def test_parse_group(text: str, group: tuple[int, ...]) -> None:
    assert parse_group(text) == group


@pytest.mark.parametrize("text", ["", "a", "0,", "[0,1", "0,1]", "-1", "0;1", "[]", "0,,1"])
def test_parse_group_refuses(text: str) -> None:
    with pytest.raises(pytest.UsageError, match="expected device ids|unbalanced brackets"):
        parse_group(text)


def test_groups_default_and_ownership() -> None:
    assert parse_groups([]) == [(0,)]
    groups = parse_groups(["0,1", "[2,3]"])
    assert groups == [(0, 1), (2, 3)]
    assert worker_group(groups, "gw1") == (2, 3) and worker_group(groups, "main") == (0, 1)
    check_workers(groups, 2)
    with pytest.raises(pytest.UsageError, match="3 pytest-xdist workers but only 2 device groups"):
        check_workers(groups, 3)

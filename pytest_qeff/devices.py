"""``--device-group``: which accelerator devices a run uses, and which group each worker owns.

One occurrence of the option is one group of devices used together (tensor slicing across them):
``--device-group 0,1`` is one two-device group; ``[0,1]`` (QEfficient's spelling) is accepted too.
Several occurrences are several groups, and under pytest-xdist worker ``gwN`` owns group ``N``, so
two workers never drive the same device. The ``ort`` backend ignores the devices but records them.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

__all__ = ["DeviceGroup", "parse_group", "parse_groups", "worker_group", "check_workers"]

DeviceGroup = tuple[int, ...]

def parse_group(text: str) -> DeviceGroup:
    """``"0,1"`` or ``"[0,1]"`` → ``(0, 1)``, by qeff's one device-group parser."""
    from qeff.errors import UsageError
    from qeff.inputs import parse_device_group

    try:
        ids = parse_device_group(text)
    except UsageError as exc:
        raise pytest.UsageError(f"--device-group: {exc}") from None
    if not ids:
        raise pytest.UsageError(f"--device-group {text!r}: expected device ids separated by commas, like 0 or 0,1 or [0,1]")
    return tuple(ids)


def parse_groups(values: Sequence[str] | None) -> list[DeviceGroup]:
    """Every ``--device-group`` value; default one group holding device 0."""
    groups = [parse_group(v) for v in values or ["0"]]
    seen: dict[int, DeviceGroup] = {}
    for group in groups:
        for device in group:
            if device in seen:
                raise pytest.UsageError(
                    f"--device-group: device {device} is in two groups ({_fmt(seen[device])} and {_fmt(group)}); "
                    f"each group must own its devices"
                )
            seen[device] = group
    return groups


def check_workers(groups: Sequence[DeviceGroup], workers: int) -> None:
    """With several groups, each xdist worker needs a group of its own."""
    if len(groups) <= 1:
        return
    if workers == 0:
        raise pytest.UsageError(
            f"{len(groups)} device groups given but the tests run in one process: add -n {len(groups)} "
            f"(pytest-xdist) so that each worker owns one group"
        )
    if workers > len(groups):
        raise pytest.UsageError(
            f"{workers} pytest-xdist workers but only {len(groups)} device groups: two workers would share "
            f"devices; use -n {len(groups)} or give more --device-group options"
        )


def worker_group(groups: Sequence[DeviceGroup], worker_id: str) -> DeviceGroup:
    """The group of ``worker_id`` (``"gw3"`` → ``groups[3]``; ``"main"`` → the first)."""
    index = int(worker_id[2:]) if worker_id.startswith("gw") and worker_id[2:].isdigit() else 0
    return groups[index % len(groups)]


def _fmt(group: DeviceGroup) -> str:
    return ",".join(map(str, group))

"""The merge of several workers' pull/push/create progress into one stream."""

from __future__ import annotations

from typing import Any

import orjson

from oshepherd.api.fanout import ProgressMerge

GB = 1_000_000_000


def merged(merge: ProgressMerge, worker: str, **line: Any) -> dict[str, Any] | None:
    raw = merge.merge(worker, line)
    if raw is None:
        return None
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    value: dict[str, Any] = orjson.loads(raw)
    return value


def test_a_status_without_a_digest_is_said_once_for_the_fleet() -> None:
    merge = ProgressMerge(workers=2)
    assert merged(merge, "a", status="pulling manifest") == {"status": "pulling manifest"}
    assert merged(merge, "b", status="pulling manifest") is None
    assert merged(merge, "b", status="verifying sha256 digest") == {
        "status": "verifying sha256 digest"
    }


def test_a_layer_sums_its_workers_and_counts_the_silent_ones_at_the_largest_total() -> None:
    merge = ProgressMerge(workers=3)
    first = merged(
        merge, "a", status="pulling abc", digest="sha256:abc", total=4 * GB, completed=GB
    )
    # b and c have not reported the layer yet: the bar is full length from the start.
    assert first == {
        "status": "pulling abc",
        "digest": "sha256:abc",
        "total": 12 * GB,
        "completed": GB,
        "workers": 1,
    }
    second = merged(
        merge, "b", status="pulling abc", digest="sha256:abc", total=4 * GB, completed=3 * GB
    )
    assert second is not None
    assert (second["total"], second["completed"], second["workers"]) == (12 * GB, 4 * GB, 2)
    again = merged(
        merge, "a", status="pulling abc", digest="sha256:abc", total=4 * GB, completed=2 * GB
    )
    assert again is not None
    assert (again["total"], again["completed"], again["workers"]) == (12 * GB, 5 * GB, 2)


def test_layers_are_merged_apart_and_odd_sizes_count_as_nothing() -> None:
    merge = ProgressMerge(workers=2)
    merged(merge, "a", status="pulling x", digest="sha256:x", total=10, completed=10)
    other = merged(merge, "a", status="pulling y", digest="sha256:y", total=True, completed="5")
    assert other is not None
    assert (other["total"], other["completed"]) == (0, 0)

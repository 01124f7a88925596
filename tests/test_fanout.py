"""The merge of several workers' pull/push/create progress into one stream."""

from __future__ import annotations

from typing import Any

import orjson

from oshepherd.api.fanout import ProgressMerge

GB = 1_000_000_000


def objects(raw: list[bytes]) -> list[dict[str, Any]]:
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in raw)
    return [orjson.loads(line) for line in raw]


def merged(merge: ProgressMerge, worker: str, **line: Any) -> dict[str, Any] | None:
    """The one line ``merge`` sends for ``line``, or None."""
    sent = objects(merge.merge(worker, line))
    assert len(sent) <= 1
    return sent[0] if sent else None


def layer(merge: ProgressMerge, worker: str, total: int, completed: int) -> tuple[int, int]:
    line = merged(merge, worker, status="pulling d", digest="sha256:d", total=total,
                  completed=completed)  # fmt: skip
    assert line is not None
    return line["total"], line["completed"]


def test_a_status_without_a_digest_is_said_once_for_the_fleet() -> None:
    merge = ProgressMerge(workers=2)
    assert merged(merge, "a", status="pulling manifest") == {"status": "pulling manifest"}
    assert merged(merge, "b", status="pulling manifest") is None
    assert merged(merge, "b", status="verifying sha256 digest") is None  # a is not there yet
    assert merged(merge, "a", status="verifying sha256 digest") == {
        "status": "verifying sha256 digest"
    }
    assert merged(merge, "b", status="verifying sha256 digest") is None


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
        "worker": "a",
        "worker_total": 4 * GB,
        "worker_completed": GB,
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


def test_totals_and_completed_never_drop() -> None:
    merge = ProgressMerge(workers=2)
    assert layer(merge, "a", 4 * GB, GB) == (8 * GB, GB)  # b counted at a's total
    # b's layer is smaller than a's: the sum would drop to 6 GB; the bar keeps its length.
    assert layer(merge, "b", 2 * GB, 0) == (8 * GB, GB)
    assert layer(merge, "a", 4 * GB, 4 * GB) == (8 * GB, 4 * GB)
    # A host that starts a part again reports less done: the merged count stays.
    assert layer(merge, "b", 2 * GB, 0) == (8 * GB, 4 * GB)
    assert layer(merge, "b", 2 * GB, 2 * GB) == (8 * GB, 6 * GB)
    # Growing totals do show.
    assert layer(merge, "b", 5 * GB, 2 * GB)[0] == 9 * GB


def test_the_tail_waits_for_every_host_to_have_every_layer() -> None:
    """The bug report: "verifying" and "writing manifest" from the first host to finish,
    then "pulling" lines again from the others."""
    merge = ProgressMerge(workers=2)
    assert merged(merge, "a", status="pulling manifest") is not None
    assert merged(merge, "b", status="pulling manifest") is None
    assert layer(merge, "a", 100, 100) == (200, 100)
    assert merged(merge, "a", status="verifying sha256 digest") is None
    assert merged(merge, "a", status="writing manifest") is None
    assert layer(merge, "b", 100, 50) == (200, 150)  # b still pulls: nothing said yet
    assert layer(merge, "b", 100, 100) == (200, 200)
    assert objects(merge.merge("b", {"status": "verifying sha256 digest"})) == [
        {"status": "verifying sha256 digest"}
    ]
    assert objects(merge.merge("b", {"status": "writing manifest"})) == [
        {"status": "writing manifest"}
    ]
    assert merge.end("a") == merge.end("b") == []


def test_held_lines_leave_in_order_when_the_last_host_ends() -> None:
    merge = ProgressMerge(workers=3)
    for worker in "abc":
        merged(merge, worker, status="pulling manifest")
    layer(merge, "a", 10, 10)
    assert merged(merge, "a", status="verifying sha256 digest") is None
    assert merged(merge, "a", status="writing manifest") is None
    assert merged(merge, "b", status="writing manifest") is None  # "verifying" is first
    assert merge.end("c") == []  # c failed: b has still not verified
    assert merged(merge, "a", status="removing unused layers") is None
    assert objects(merge.end("b")) == [
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "removing unused layers"},
    ]
    assert merge.end("a") == []


def test_a_first_line_is_said_at_once_and_a_lone_host_is_not_held() -> None:
    merge = ProgressMerge(workers=1)
    assert merged(merge, "a", status="using existing layer sha256:x") is not None
    assert merged(merge, "a", status="writing manifest") == {"status": "writing manifest"}

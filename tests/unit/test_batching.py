from __future__ import annotations

import pytest

from zimage_backend.batching import plan_calls


def test_groups_by_key_in_arrival_order_and_splits():
    items = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("c", 5), ("a", 6), ("b", 7)]
    calls = plan_calls(items, key=lambda item: item[0], max_per_call=2)
    assert calls == [[("a", 1), ("a", 3)], [("a", 4), ("a", 6)], [("b", 2), ("b", 7)],
                     [("c", 5)]]


def test_every_item_is_planned_once():
    items = list(range(23))
    calls = plan_calls(items, key=lambda i: i % 3, max_per_call=4)
    assert sorted(i for call in calls for i in call) == items
    assert all(1 <= len(call) <= 4 for call in calls)
    assert all(len({i % 3 for i in call}) == 1 for call in calls)


def test_rejects_empty_calls():
    with pytest.raises(ValueError, match="at least 1"):
        plan_calls([1], key=lambda i: i, max_per_call=0)


def test_call_size_can_depend_on_the_group():
    items = [("small", i) for i in range(5)] + [("large", i) for i in range(3)]
    calls = plan_calls(items, key=lambda item: item[0],
                       max_per_call=lambda item: 4 if item[0] == "small" else 1)
    assert [len(c) for c in calls] == [4, 1, 1, 1, 1]
    assert calls[0][0][0] == "small" and calls[-1] == [("large", 2)]


def test_pixel_budget_decides_how_many_images_share_a_call(settings):
    limits = settings.limits
    assert limits.max_pixels_per_call == 1024 * 1024
    assert limits.images_per_call(512, 512) == min(4, limits.max_images_per_call)
    assert limits.images_per_call(1024, 1024) == 1
    assert limits.images_per_call(768, 768) == 1
    assert limits.images_per_call(2048, 2048) == 1  # over budget alone: still served
    assert limits.images_per_call(64, 64) == limits.max_images_per_call

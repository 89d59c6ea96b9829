"""The weights label that METADATA and the PNG text chunk carry never shows a server path."""

from __future__ import annotations

import dataclasses

import pytest


@pytest.mark.parametrize("source, label", [
    ("Tongyi-MAI/Z-Image-Turbo", "pretrained (Tongyi-MAI/Z-Image-Turbo)"),
    ("/srv/models/private/z-image", "pretrained (z-image)"),
    ("~/weights/zimage", "pretrained (zimage)"),
    ("./weights/zimage", "pretrained (zimage)"),
])
def test_weights_label(settings, source, label):
    model = dataclasses.replace(settings.model, load_format="auto", source=source)
    assert model.weights_label == label


def test_an_existing_relative_folder_is_named_by_its_last_part(settings, tmp_path, monkeypatch):
    (tmp_path / "mine" / "zt").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    model = dataclasses.replace(settings.model, load_format="auto", source="mine/zt")
    assert model.weights_label == "pretrained (zt)"

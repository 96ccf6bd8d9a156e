"""Image tags and the semantic version rule (new architecture: major; new data or params: minor; else patch)."""

from __future__ import annotations

import pytest

from tasks.packaging.image_version import TAG_PATTERN, Release, SemVer, image_tag, next_version


def release(version: str | None = "1.0.0", arch: str = "amd64", model: str = "m1", recipe: str = "r1",
            architecture: str = "digits_cnn:8x8x1:abc", data: str = "d1", params: str = "p1") -> Release:
    return Release(SemVer.parse(version) if version else None, arch, model, recipe, architecture, data, params)


def test_tag_names_version_optimisation_runtime_and_arch():
    tag = image_tag(SemVer(2, 1, 0), "tflite_int8_pruned", "arm64")
    assert tag == "model-v2.1.0-int8-pruned-tflite-arm64"
    match = TAG_PATTERN.match(tag)
    assert (match["major"], match["optimisation"], match["runtime"], match["arch"]) == ("2", "int8-pruned", "tflite",
                                                                                          "arm64")
    assert image_tag(SemVer(1, 0, 3), "onnx_fp32", "amd64") == "model-v1.0.3-fp32-onnx-amd64"


def test_labels_round_trip_through_an_image():
    candidate = release(version=None)
    read_back = Release.from_image("model-v3.2.1-int8-tflite-amd64", candidate.labels())
    assert read_back == release("3.2.1")
    assert Release.from_image("latest", candidate.labels()) is None
    assert Release.from_image("model-v1.0.0-int8-tflite-amd64", {}) is None  # not an edgeloop image


def test_first_release_is_1_0_0():
    assert next_version([], [release(None)]) == (SemVer(1, 0, 0), "first release in this repository")


@pytest.mark.parametrize(("change", "expected", "why"), [
    ({"architecture": "resnet8:32x32x3:abc"}, "2.0.0", "architecture"),
    ({"data": "d2"}, "1.3.0", "new data"),
    ({"params": "p2"}, "1.3.0", "new parameters"),
    ({"data": "d2", "params": "p2"}, "1.3.0", "new data and parameters"),
    ({"recipe": "r2"}, "1.2.5", "repackaged"),
    ({"model": "m2"}, "1.2.5", "repackaged"),  # another registered version, same inputs (even byte-identical)
    ({"architecture": "resnet8:32x32x3:abc", "data": "d2"}, "2.0.0", "architecture"),
])
def test_the_bump_follows_what_changed_since_the_newest_release(change, expected, why):
    history = [release("1.0.0", model="m-a", data="d0"), release("1.2.4", model="m-b"),
               release("1.2.4", model="m-b", arch="arm64"), release("0.9.0", model="m-c")]
    version, reason = next_version(history, [release(None, **change)])
    assert str(version) == expected
    assert why in reason


def test_the_same_model_and_recipe_keeps_its_version_on_every_platform():
    history = [release("1.0.0", model="m0"), release("1.1.0")]
    # arm64 added later to the 1.1.0 release: same model, same (platform-independent) recipe
    assert next_version(history, [release(None, arch="arm64")])[0] == SemVer(1, 1, 0)


def test_semver_parsing_is_strict():
    assert SemVer.parse("v1.2.3") == SemVer(1, 2, 3)
    with pytest.raises(ValueError, match="not a semantic version"):
        SemVer.parse("1.2")
    assert SemVer(1, 9, 0) < SemVer(1, 10, 0)

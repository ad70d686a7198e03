"""Artifact sources are accepted only inside the artifact root: the string rules and the
filesystem's answer (symlinks), for local and object-store roots."""

from __future__ import annotations

import os

import pytest

from app.errors import InvalidInput, NotFound
from app.registry.paths import check_relative_path, resolve_source


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "artifacts"
    (r / "exp" / "run").mkdir(parents=True)
    (r / "exp" / "run" / "model.onnx").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", r / "exp" / "link-out")
    os.symlink(r / "exp" / "run" / "model.onnx", r / "exp" / "link-in")
    return r


BAD = [
    "file:///etc/passwd",
    "/etc/passwd",
    "../secret.txt",
    "exp/../../secret.txt",
    "{root}/../secret.txt",
    "{root}/exp/%2e%2e/%2e%2e/secret.txt",
    "%2e%2e%2fsecret.txt",
    "%252e%252e%252fsecret.txt",
    "{root}\\..\\secret.txt",
    "exp\\run\\model.onnx",
    "{root}/exp/run/model.onnx#frag",
    "{root}/exp/run/model.onnx?x=1",
    "http://example.com/model.onnx",
    "s3://bucket/model.onnx",
    "runs:/abc/model",
    "models:/iris/1",
    "file://otherhost{root}/exp/run/model.onnx",
    "{root}/exp/link-out",
    "{root}/exp/run/model.onnx\x00.txt",
    "",
]


@pytest.mark.parametrize("source", BAD)
def test_sources_outside_the_root_are_refused(root, source):
    source = source.replace("{root}", str(root))
    with pytest.raises(InvalidInput) as info:
        resolve_source(source, str(root))
    assert info.value.code == "unsafe_source"
    assert info.value.details["field"] == "source"


def test_sources_inside_the_root_resolve(root):
    real = os.path.realpath(root / "exp" / "run" / "model.onnx")
    assert resolve_source(str(root / "exp" / "run" / "model.onnx"), str(root)) == real
    assert resolve_source(f"file://{root}/exp/run/model.onnx", str(root)) == real
    assert resolve_source("exp/run/model.onnx", str(root)) == real
    assert resolve_source(str(root / "exp" / "link-in"), str(root)) == real  # a link that stays inside
    with pytest.raises(NotFound):
        resolve_source(str(root / "exp" / "missing.onnx"), str(root))


def test_object_store_root():
    root = "s3://bucket/prefix"
    assert resolve_source("s3://bucket/prefix/a/model.onnx", root) == "s3://bucket/prefix/a/model.onnx"
    for bad in (
        "s3://bucket/other/model.onnx",
        "s3://bucket/prefixed/model.onnx",
        "s3://other/prefix/model.onnx",
        "s3://bucket/prefix/../other/model.onnx",
        "s3://bucket/prefix/%2e%2e/x",
        "/etc/passwd",
        "file:///etc/passwd",
        "gs://bucket/prefix/model.onnx",
    ):
        with pytest.raises(InvalidInput):
            resolve_source(bad, root)


@pytest.mark.parametrize("value", ["/abs", "../x", "a/../../x", "a\\b", "%2e%2e", "s3://x", ".", "a?b", ""])
def test_relative_artifact_paths(value):
    with pytest.raises(InvalidInput):
        check_relative_path(value)


def test_relative_artifact_path_ok():
    assert check_relative_path("model") == "model"
    assert check_relative_path("models/onnx/") == "models/onnx"

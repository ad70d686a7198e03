"""One test per root cause of a 5xx that tests/integration/test_fuzz.py found (the page-token
and version parsers have their own file, test_input_parsers.py)."""

from __future__ import annotations

from tests.unit.test_input_parsers import client  # noqa: F401  (the in-process API, as a fixture)

ROW = [5.1, 3.5, 1.4, 0.2]


def _upload(c, name: str, fmt: str, data: bytes):
    return c.post(f"/v1/models/{name}/versions", files={"file": ("model.bin", data, "application/octet-stream")},
                  data={"format": fmt, "n_features": "4", "task": "classification"})


def test_a_trusted_pickle_that_cannot_be_unpickled_is_409_not_500(client):  # noqa: F811
    """Found as: POST .../versions (bytes the fuzzer chose, format sklearn-pickle), .../trust,
    .../convert -> 500 KeyError from pickle. A pickle is stored without being loaded, so the
    first load (conversion, the native runtime) is where a broken file shows."""
    r = _upload(client, "broken-pickle", "sklearn-pickle", b"b=0\x08\xff\x11\xfe&")
    assert r.status_code == 201, r.text
    assert client.post("/v1/models/broken-pickle/versions/1/trust").status_code == 200
    r = client.post("/v1/models/broken-pickle/versions/1/convert")
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "unloadable_model" and "cannot be loaded" in r.json()["error"]
    r = client.post("/v1/endpoints", json={"name": "broken-native", "target": "broken-pickle/1", "runtime": "native"})
    assert r.status_code == 201, r.text
    r = client.post("/v1/endpoints/broken-native/predict", json={"instances": [ROW]})
    assert r.status_code == 409 and r.json()["code"] == "unloadable_model", r.text

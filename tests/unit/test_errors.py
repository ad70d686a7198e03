import pickle

import pytest
from fastapi.exceptions import RequestValidationError

from app import errors as E
from app.api.errors import STATUS_BY_ERROR, error_response, status_for, validation_error


def test_errors_survive_pickling_with_code_and_details():
    err = E.InvalidInput("bad row", details={"field": "instances[0]"})
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is E.InvalidInput
    assert (again.message, again.code, again.details) == ("bad row", "invalid_input", {"field": "instances[0]"})


@pytest.mark.parametrize(
    "exc,status",
    [
        (E.BadRequest("x"), 400), (E.InvalidInput("x"), 422), (E.Unauthenticated("x"), 401),
        (E.PermissionDenied("x"), 403), (E.NotFound("x"), 404), (E.Conflict("x"), 409),
        (E.PayloadTooLarge("x"), 413), (E.Overloaded("x"), 429), (E.DependencyUnavailable("x"), 503),
        (E.DependencyTimeout("x"), 503), (E.RequestTimeout("x"), 504),
        (E.ModelError("x"), 500), (E.MatihError("x"), 500),
    ],
)
def test_one_table_maps_every_error(exc, status):
    assert status_for(exc) == status


def test_every_error_class_is_in_the_table():
    classes = {c for c in vars(E).values() if isinstance(c, type) and issubclass(c, E.MatihError)}
    assert classes <= {c for c, _ in STATUS_BY_ERROR}


def test_error_body_and_retry_after():
    resp = error_response(E.DependencyUnavailable("MLflow down", retry_after_s=7))
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "7"
    assert b'"code":"dependency_unavailable"' in resp.body.replace(b" ", b"")


def test_invalid_json_is_400_and_bad_values_are_422():
    bad_json = RequestValidationError([{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error"}])
    assert isinstance(validation_error(bad_json), E.BadRequest)
    bad_value = RequestValidationError([{"type": "missing", "loc": ("body", "dataset"), "msg": "Field required"}])
    err = validation_error(bad_value)
    assert isinstance(err, E.InvalidInput)
    assert err.details["field"] == "dataset" and "dataset" in err.message

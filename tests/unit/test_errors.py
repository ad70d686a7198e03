import pickle

import grpc
import pytest
from fastapi.exceptions import RequestValidationError

from app import errors as E
from app.api.errors import (
    GRPC_STATUS_BY_ERROR,
    STATUS_BY_ERROR,
    error_response,
    grpc_status,
    status_for,
    validation_error,
)


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


S = grpc.StatusCode


@pytest.mark.parametrize(
    "exc,code",
    [
        (E.BadRequest("x"), S.INVALID_ARGUMENT), (E.InvalidInput("x"), S.INVALID_ARGUMENT),
        (E.RegistryRejected("x"), S.INVALID_ARGUMENT), (E.Unauthenticated("x"), S.UNAUTHENTICATED),
        (E.PermissionDenied("x"), S.PERMISSION_DENIED), (E.NotFound("x"), S.NOT_FOUND), (E.Conflict("x"), S.ABORTED),
        (E.PayloadTooLarge("x"), S.RESOURCE_EXHAUSTED), (E.Overloaded("x"), S.RESOURCE_EXHAUSTED),
        (E.DependencyUnavailable("x"), S.UNAVAILABLE), (E.DependencyTimeout("x"), S.DEADLINE_EXCEEDED),
        (E.RequestTimeout("x"), S.DEADLINE_EXCEEDED), (E.ModelError("x"), S.INTERNAL), (E.MatihError("x"), S.INTERNAL),
    ],
)
def test_the_grpc_table_maps_every_error(exc, code):
    assert grpc_status(exc)[0] == code


def test_both_tables_list_the_same_classes_in_the_same_order():
    assert [c for c, _ in GRPC_STATUS_BY_ERROR] == [c for c, _ in STATUS_BY_ERROR]


def test_grpc_details_are_the_code_and_the_redacted_message():
    code, details = grpc_status(E.DependencyUnavailable("MLflow at http://u:pw@mlflow:5000 is down"))
    assert code == S.UNAVAILABLE and details.startswith("dependency_unavailable: MLflow at ") and "pw" not in details


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

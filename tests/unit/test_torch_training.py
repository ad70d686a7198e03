"""The torch model zoo and the pieces of torch training that need no Ray: the in-process loop
(what Tune trials run), pipeline stages, ONNX export parity and checkpoint listing. The
strategies on Ray Train are covered by the integration tests."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.errors import InvalidInput
from app.onnx.torch_export import export_onnx
from app.training.data import PreparedData, prepare_data
from app.training.spec import TorchModelSpec, TrainingJobSpec
from app.training.torch_models import (
    build_model,
    merge_stage_state_dicts,
    pipeline_stages,
    split_state_dict,
)
from app.training.torch_checkpoints import _read_checkpoint_dir, _write_checkpoint, list_checkpoints
from app.training.torch_loop import _batches, evaluate_model, torch_hparams, train_in_process
from app.training.validation import onnx_outputs

SMALL_TRANSFORMER = {"kind": "tab_transformer", "d_model": 16, "heads": 2, "layers": 1}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: torch's thread pool only adds contention on a 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def iris() -> PreparedData:
    return prepare_data("builtin://iris", "target", None, 0.2, 42, encode_labels=True)


@pytest.fixture(scope="module")
def digits() -> PreparedData:
    data = prepare_data("builtin://digits", "target", None, 0.2, 42, encode_labels=True)
    # 600 training rows are plenty to beat chance (10%) and keep the test fast.
    data.X_train, data.y_train = data.X_train[:600] / 16, data.y_train[:600]
    data.X_holdout = data.X_holdout / 16
    return data


@pytest.fixture(scope="module")
def regression() -> PreparedData:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 4)).astype(np.float32)
    y = (X @ np.array([1.5, -2.0, 0.5, 1.0]) + 0.1 * rng.normal(size=120)).astype(np.float32)
    return PreparedData(X[:90], y[:90], X[90:], y[90:], [f"f{i}" for i in range(4)], "regression")


def _spec(model: dict, uri: str = "builtin://iris", **hyperparameters) -> TrainingJobSpec:
    return TrainingJobSpec(
        name="t", framework="torch", model=model, dataset={"uri": uri, "target": "target"},
        hyperparameters={"epochs": 3, "lr": 0.01, "batch_size": 32, **hyperparameters},
    )


@pytest.mark.parametrize(
    ("model", "dataset", "chance"),
    [({"kind": "mlp", "hidden": [32, 32]}, "iris", 1 / 3),
     (SMALL_TRANSFORMER, "iris", 1 / 3),
     ({"kind": "cnn", "channels": [8, 16]}, "digits", 1 / 10)],
    ids=["mlp", "tab_transformer", "cnn"],
)
def test_zoo_models_train_in_process_and_beat_chance(model, dataset, chance, request):
    data = request.getfixturevalue(dataset)
    seen = []
    trained, metrics = train_in_process(_spec(model), data, {"epochs": 4, "lr": 0.02},
                                        lambda epoch, m: seen.append((epoch, m)))
    assert [e for e, _ in seen] == [1, 2, 3, 4]  # the trial's hparams override the spec's epochs
    assert {"val_loss", "train_loss", "accuracy", "f1", "log_loss"} <= set(seen[-1][1])
    assert metrics["accuracy"] > chance + 0.25, metrics
    assert not trained.training and next(trained.parameters()).device.type == "cpu"


def test_regression_trains_and_reports_rmse(regression):
    spec = _spec({"kind": "mlp", "hidden": [16]})
    model, metrics = train_in_process(spec, regression, {"epochs": 30, "lr": 0.05, "batch_size": 16},
                                      lambda e, m: None)
    assert metrics["r2"] > 0.8 and metrics["rmse"] < 1.0, metrics
    assert abs(metrics["val_loss"] - metrics["rmse"] ** 2) < 1e-3


def test_epoch_metrics_without_sklearn_match_the_gate_metrics(iris, regression):
    torch.manual_seed(0)
    for data in (iris, regression):
        model = build_model(TorchModelSpec(hidden=[8]), data.n_features, data.n_outputs)
        fast, full = evaluate_model(model, data, "cpu", full=False), evaluate_model(model, data, "cpu")
        for key in set(fast) & set(full) - {"log_loss"}:
            assert fast[key] == pytest.approx(full[key], rel=1e-6), key


def test_mlp_shape_and_dropout():
    model = build_model(TorchModelSpec(hidden=[8, 4], dropout=0.2), 5, 3)
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert model(torch.zeros(7, 5)).shape == (7, 3)


def test_cnn_image_shapes():
    assert build_model(TorchModelSpec(kind="cnn"), 64, 10)(torch.zeros(3, 64)).shape == (3, 10)
    explicit = build_model(TorchModelSpec(kind="cnn", image_shape=[2, 3, 4]), 24, 2)
    assert explicit(torch.zeros(5, 24)).shape == (5, 2)
    with pytest.raises(InvalidInput, match="13 features is not a square"):
        build_model(TorchModelSpec(kind="cnn"), 13, 2)
    with pytest.raises(InvalidInput, match=r"image_shape \[1, 4, 4\] holds 16 values .* 13 features"):
        build_model(TorchModelSpec(kind="cnn", image_shape=[1, 4, 4]), 13, 2)


def test_pipeline_stages_balance_parameters_and_map_state_dicts_back():
    torch.manual_seed(0)
    model = build_model(TorchModelSpec(hidden=[64, 8, 8], dropout=0.1), 10, 3).eval()
    sizes = {k: [sum(p.numel() for p in s.parameters()) for s in pipeline_stages(model, k)] for k in (1, 2, 3, 4)}
    # Linear sizes 704, 520, 72, 27: the split minimising the largest stage.
    assert sizes == {1: [1323], 2: [704, 619], 3: [704, 520, 99], 4: [704, 520, 72, 27]}
    x = torch.randn(6, 10)
    for k in (2, 3):
        stages = pipeline_stages(model, k)
        assert all(isinstance(s, torch.nn.Sequential) for s in stages)
        out = x
        for stage in stages:
            out = stage(out)
        assert torch.equal(out, model(x))
        full = model.state_dict()
        merged = merge_stage_state_dicts(model, [s.state_dict() for s in stages])
        assert merged.keys() == full.keys() and all(torch.equal(merged[key], full[key]) for key in full)
        assert [list(p) for p in split_state_dict(model, full, k)] == [list(s.state_dict()) for s in stages]
    # Stage weights changed elsewhere (another rank) land on the right keys of a fresh model.
    fresh = build_model(TorchModelSpec(hidden=[64, 8, 8], dropout=0.1), 10, 3)
    fresh.load_state_dict(merge_stage_state_dicts(fresh, [s.state_dict() for s in pipeline_stages(model, 3)]))
    assert torch.equal(fresh.eval()(x), model(x))


def test_pipeline_stages_refuse_what_cannot_be_split():
    model = build_model(TorchModelSpec(hidden=[4]), 3, 2)
    with pytest.raises(InvalidInput, match="cannot cut a model of 2 layers into 3 stages"):
        pipeline_stages(model, 3)
    with pytest.raises(InvalidInput, match="splits an nn.Sequential"):
        pipeline_stages(build_model(TorchModelSpec(kind="cnn"), 16, 2), 2)


def test_batches_shard_rows_evenly_and_pipeline_batches_keep_one_shape():
    shards = [_batches(10, 3, seed=1, epoch=2, rank=r, world=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    seen = torch.cat([torch.cat(s) for s in shards])
    assert set(seen.tolist()) == set(range(10)) and len(seen) == 12  # padded by repeating rows
    assert {len(b) for b in _batches(10, 4, seed=1, epoch=1, whole=True)} == {4}
    assert torch.equal(torch.cat(_batches(10, 4, 1, 5)), torch.cat(_batches(10, 4, 1, 5)))  # resumable order


def test_hyperparameters_merge_and_refuse_bad_values():
    spec = _spec({"kind": "mlp"}, epochs=7)
    assert torch_hparams(spec, {"lr": 0.5}).model_dump(include={"epochs", "lr"}) == {"epochs": 7, "lr": 0.5}
    with pytest.raises(InvalidInput, match="batch_size"):
        torch_hparams(spec, {"batch_size": 0})


@pytest.mark.parametrize(
    "model", [{"kind": "mlp", "hidden": [16, 16]}, {"kind": "cnn", "channels": [4, 8]}, SMALL_TRANSFORMER],
    ids=["mlp", "cnn", "tab_transformer"],
)
def test_export_onnx_parity_for_every_zoo_model(model, iris, digits):
    data = digits if model["kind"] == "cnn" else iris
    torch.manual_seed(0)
    net = build_model(TorchModelSpec(**model), data.n_features, data.n_outputs)
    proto, diff = export_onnx(net, data)
    assert diff < 1e-4
    assert [o.name for o in proto.graph.output] == ["label", "probabilities"]
    assert proto.graph.input[0].name == "input"
    labels, proba = onnx_outputs(proto.SerializeToString(), data.X_holdout[:7])  # any batch size
    assert proba.shape == (7, data.n_outputs) and labels.dtype == np.int64
    with torch.no_grad():
        expected = net(torch.from_numpy(data.X_holdout[:7])).argmax(dim=1).numpy()
    assert np.array_equal(labels, np.asarray(data.classes)[expected])


def test_export_onnx_labels_are_the_classes_when_they_are_integers_or_strings(iris):
    data = PreparedData(iris.X_train, iris.y_train, iris.X_holdout, iris.y_holdout, iris.feature_names,
                        "classification", classes=[3, 5, 9])
    torch.manual_seed(0)
    net = build_model(TorchModelSpec(hidden=[8]), 4, 3)
    proto, _ = export_onnx(net, data)
    labels, _ = onnx_outputs(proto.SerializeToString(), data.X_holdout)
    assert set(labels.tolist()) <= {3, 5, 9}
    assert {p.key: p.value for p in proto.metadata_props}["matih.label_output"] == "classes"
    data.classes = ["setosa", "versicolor", "virginica"]
    proto, diff = export_onnx(net, data)
    labels, _ = onnx_outputs(proto.SerializeToString(), data.X_holdout)
    with torch.no_grad():
        expected = net(torch.from_numpy(data.X_holdout)).argmax(dim=1).numpy()
    assert diff < 1e-4 and labels.tolist() == [data.classes[i] for i in expected]
    assert {p.key: p.value for p in proto.metadata_props}["matih.label_output"] == "classes"
    data.classes = [False, True, "maybe"]
    proto, _ = export_onnx(net, data)
    labels, _ = onnx_outputs(proto.SerializeToString(), data.X_holdout)
    assert labels.tolist() == expected.tolist()
    assert {p.key: p.value for p in proto.metadata_props}["matih.label_output"] == "index"


def test_export_onnx_regression_has_one_output(regression):
    torch.manual_seed(0)
    net = build_model(TorchModelSpec(hidden=[8]), regression.n_features, 1)
    proto, diff = export_onnx(net, regression)
    assert diff < 1e-4 and [o.name for o in proto.graph.output] == ["variable"]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": regression.X_holdout[:5]})[0].shape == (5, 1)


def _write_like_the_loop(run_dir, name: str, epoch: int, val_loss: float, model: torch.nn.Module):
    path = os.path.join(run_dir, name)
    os.makedirs(path)
    meta = {"epoch": epoch, "metrics": {"epoch": epoch, "val_loss": val_loss}, "strategy": "data_parallel",
            "created_at": f"2026-01-01T00:00:0{epoch}+00:00", "world_size": 2, "attempt": "a", "history": []}
    _write_checkpoint(path, model.state_dict(), torch.optim.Adam(model.parameters()).state_dict(), meta)
    return path


def test_list_checkpoints_reads_what_the_loop_writes(tmp_path):
    run = tmp_path / "job1"
    run.mkdir()
    model = build_model(TorchModelSpec(hidden=[4]), 3, 2)
    for name, epoch in (("checkpoint_epoch0003_ar0", 3), ("checkpoint_epoch0001_ar0", 1), ("checkpoint_epoch0010_ar1", 10)):
        _write_like_the_loop(str(run), name, epoch, 1.0 / epoch, model)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    (run / "not_a_checkpoint").mkdir()

    listed = list_checkpoints(str(run))
    assert [c["epoch"] for c in listed] == [1, 3, 10]
    assert listed[1] == {"path": str(run / "checkpoint_epoch0003_ar0"), "name": "checkpoint_epoch0003_ar0", "epoch": 3,
                         "metrics": {"epoch": 3, "val_loss": 1 / 3}, "created_at": "2026-01-01T00:00:03+00:00"}
    assert list_checkpoints(str(tmp_path / "missing")) == []
    assert [c["epoch"] for c in list_checkpoints(f"file://{run}")] == [1, 3, 10]


def test_list_checkpoints_on_s3(tmp_path):
    from pyarrow import fs as pafs

    from app.settings import load_settings
    from app.storage.s3 import resolve_uri
    from tests.s3server import start_s3_server

    server = start_s3_server()
    try:
        settings = load_settings(matih_home=str(tmp_path / "home"), **server.settings())
        server.create_bucket("runs")
        model = build_model(TorchModelSpec(hidden=[4]), 3, 2)
        for name, epoch in (("b", 2), ("a", 1)):
            _write_like_the_loop(str(tmp_path / "local"), name, epoch, 0.5, model)
        fs_path, s3 = resolve_uri("s3://runs/train/job1", settings)
        pafs.copy_files(str(tmp_path / "local"), fs_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)

        listed = list_checkpoints("s3://runs/train/job1/", settings)
        assert [(c["path"], c["epoch"]) for c in listed] == [("s3://runs/train/job1/a", 1), ("s3://runs/train/job1/b", 2)]
        assert list_checkpoints("s3://runs/train/nothing", settings) == []
    finally:
        server.stop()


def test_checkpoints_load_with_weights_only(tmp_path):
    model = build_model(TorchModelSpec(hidden=[4]), 3, 2)
    path = _write_like_the_loop(str(tmp_path), "c", 2, 0.5, model)
    state = _read_checkpoint_dir(path)
    assert state["meta"]["epoch"] == 2 and state["optimizer"]["param_groups"]
    fresh = build_model(TorchModelSpec(hidden=[4]), 3, 2)
    fresh.load_state_dict(state["model"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert json.loads((tmp_path / "c" / "matih.json").read_text())["strategy"] == "data_parallel"
    os.remove(tmp_path / "c" / "matih.json")
    with pytest.raises(InvalidInput, match="not a MATIH checkpoint"):
        _read_checkpoint_dir(path)

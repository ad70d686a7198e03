"""One ONNX graph for a whole ensemble: every member's graph as a prefixed subgraph fed by one
input, then the combine rule as ONNX ops. The normal ONNX runtime serves it: one model call
instead of a fan-out of N (+1 for a meta-learner).

The graph computes what :mod:`app.ensembles.combine` computes, in the same order (sums over
members in member order, in float64), so labels agree exactly and probabilities to float32
rounding; :func:`check_parity` checks that against :class:`~app.ensembles.local.LocalEnsemble`
before a fused graph is stored.

Interface: a single float input ``input`` [N, n_features]; outputs ``label`` (the class labels,
int64 or string, [N]; regressors: float [N, 1]) and, where the kind gives them,
``probabilities`` (float [N, n_classes]) -- the names the platform's ONNX runtime looks for.

Fusable kinds: ``FUSERS`` (every kind: vote with its tie rule, soft_vote, mean, median through
TopK, samme, additive, meta). Classes must be all integers or all strings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from app.ensembles.combine import total_weight
from app.ensembles.definition import EnsembleDefinition
from app.errors import ModelError

if TYPE_CHECKING:
    import onnx

    from app.ensembles.local import LocalEnsemble

INPUT = "input"
LABEL = "label"
PROBABILITIES = "probabilities"
MIN_OPSET = 17  # what skl2onnx members are written with (app/onnx/sklearn_export.py)
ML_DOMAIN = "ai.onnx.ml"


@dataclass
class _Member:
    """A member inside the fused graph: its (prefixed) output names and label type."""

    label: str
    label_type: int
    proba: str | None
    label_is_index: bool
    target: str


class _Graph:
    """The fused graph under construction: nodes, initializers and fresh names."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self.value_info: list = []
        self.functions: list = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"ens_{hint}_{self._n}"

    def const(self, value: Any, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1,
           domain: str = "", **attrs: Any) -> Any:
        from onnx import helper

        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def reduce(self, op_type: str, x: str, axis: int, keepdims: int = 1) -> str:
        """Reduce* over one axis (axes an input from opset 18, ReduceSum from 13)."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.const(np.array([axis], dtype=np.int64), "axes")], keepdims=keepdims)
        return self.op(op_type, [x], axes=[axis], keepdims=keepdims)

    def weighted_sum(self, weights: list[float], tensors: list[str]) -> str:
        """``w_0 * t_0 + w_1 * t_1 + ...`` in member order (as combine.py sums), float64."""
        acc = self.op("Mul", [tensors[0], self.const(np.float64(weights[0]), "w")])
        for w, t in zip(weights[1:], tensors[1:]):
            acc = self.op("Add", [acc, self.op("Mul", [t, self.const(np.float64(w), "w")])])
        return acc


class _Context:
    """What a fuser reads: the graph, the definition, the members, derived tensors on demand."""

    def __init__(self, graph: _Graph, defn: EnsembleDefinition, members: list[_Member]):
        self.g = graph
        self.defn = defn
        self.members = members
        self.classes = list(defn.classes or [])
        self._cache: dict[tuple[str, int], str] = {}

    @property
    def k(self) -> int:
        return len(self.classes)

    def _cached(self, key: str, i: int, build) -> str:
        if (key, i) not in self._cache:
            self._cache[(key, i)] = build()
        return self._cache[(key, i)]

    def classes_const(self) -> str:
        if all(isinstance(c, str) for c in self.classes):
            return self._cached("classes", -1, lambda: self.g.const(np.array(self.classes, dtype=object), "classes"))
        return self._cached("classes", -1, lambda: self.g.const(np.array(self.classes, dtype=np.int64), "classes"))

    def index(self, i: int) -> str:
        """Member i's label as its index in defn.classes, int64 [N] (-1 for a label outside)."""
        from onnx import TensorProto

        def build() -> str:
            m, g = self.members[i], self.g
            if m.label_is_index:
                return g.op("Cast", [m.label], "idx", to=TensorProto.INT64)
            if m.label_type == TensorProto.STRING:
                return g.op("LabelEncoder", [m.label], "idx", domain=ML_DOMAIN,
                            keys_strings=[str(c) for c in self.classes],
                            values_int64s=list(range(self.k)), default_int64=-1)
            # numeric labels: compare with the classes (Equal has no strings before opset 19)
            label = m.label if m.label_type == TensorProto.INT64 else g.op("Cast", [m.label], to=TensorProto.INT64)
            hit = g.op("Equal", [g.op("Unsqueeze", [label, g.const(np.array([1], dtype=np.int64))]),
                                 g.const(np.array([self.classes], dtype=np.int64), "classes_row")])
            found = g.op("Cast", [hit], to=TensorProto.FLOAT)  # one 1 per row, or none
            position = g.op("ArgMax", [found], axis=1, keepdims=0)
            present = g.op("Cast", [g.reduce("ReduceSum", found, 1, keepdims=0)], to=TensorProto.INT64)
            # -1 where no class matched (position 0, nothing present), as LabelEncoder's default
            return g.op("Add", [g.op("Sub", [position, g.const(np.int64(1))]), present])

        return self._cached("index", i, build)

    def index_col(self, i: int) -> str:
        return self._cached("index_col", i, lambda: self.g.op(
            "Unsqueeze", [self.index(i), self.g.const(np.array([1], dtype=np.int64))]))

    def hits(self, i: int) -> str:
        """bool [N, K]: member i voted for class k."""
        return self._cached("hits", i, lambda: self.g.op(
            "Equal", [self.index_col(i), self.g.const(np.arange(self.k, dtype=np.int64)[None, :], "range")]))

    def onehot(self, i: int) -> str:
        from onnx import TensorProto

        return self._cached("onehot", i, lambda: self.g.op("Cast", [self.hits(i)], to=TensorProto.DOUBLE))

    def proba(self, i: int) -> str:
        """Member i's probabilities, float [N, K]."""
        from onnx import TensorProto

        m = self.members[i]
        if m.proba is None:
            raise ModelError(f"member {m.target} has no probability output, which {self.defn.combine.kind} needs")
        return self._cached("proba", i, lambda: self.g.op("Cast", [m.proba], to=TensorProto.FLOAT))

    def value(self, i: int, to: int | None = None) -> str:
        """Member i's prediction as a column [N, 1], float64 (or ``to``)."""
        from onnx import TensorProto

        to = TensorProto.DOUBLE if to is None else to
        return self._cached(f"value{to}", i, lambda: self.g.op("Cast", [self.g.op(
            "Reshape", [self.members[i].label, self.g.const(np.array([-1, 1], dtype=np.int64), "shape")])], to=to))

    def label_of(self, index: str) -> str:
        """defn.classes[index] ([N] int64 index -> labels)."""
        return self.g.op("Gather", [self.classes_const(), index], axis=0)


class Fuser(ABC):
    """A combine kind as ONNX ops: :meth:`build` appends them and returns the graph's outputs
    ``{"label": tensor, "probabilities"?: tensor}`` (names in the graph)."""

    kind: ClassVar[str]

    @abstractmethod
    def build(self, ctx: _Context) -> dict[str, str]: ...


class _VoteFuser(Fuser):
    kind = "vote"

    def build(self, ctx):
        from onnx import TensorProto

        g, n = ctx.g, len(ctx.members)
        weights = ctx.defn.weights
        scores = g.weighted_sum(weights, [ctx.onehot(i) for i in range(n)])
        best = g.reduce("ReduceMax", scores, 1)
        tied = [g.op("Cast", [g.op("Equal", [g.op("GatherElements", [scores, ctx.index_col(i)], axis=1), best])],
                     to=TensorProto.FLOAT) for i in range(n)]
        first = g.op("ArgMax", [g.op("Concat", tied, axis=1)], axis=1, keepdims=1)  # the earliest tied member
        winner = g.op("GatherElements", [g.op("Concat", [ctx.index_col(i) for i in range(n)], axis=1), first], axis=1)
        winner = g.op("Reshape", [winner, g.const(np.array([-1], dtype=np.int64))])
        shares = g.op("Div", [scores, g.const(np.float64(total_weight(weights)), "total")])
        return {LABEL: ctx.label_of(winner), PROBABILITIES: g.op("Cast", [shares], to=TensorProto.FLOAT)}


class _SoftVoteFuser(Fuser):
    kind = "soft_vote"

    def build(self, ctx):
        from onnx import TensorProto

        g, weights = ctx.g, ctx.defn.weights
        probas = [g.op("Cast", [ctx.proba(i)], to=TensorProto.DOUBLE) for i in range(len(ctx.members))]
        mean = g.op("Div", [g.weighted_sum(weights, probas), g.const(np.float64(total_weight(weights)), "total")])
        label = ctx.label_of(g.op("ArgMax", [mean], axis=1, keepdims=0))
        return {LABEL: label, PROBABILITIES: g.op("Cast", [mean], to=TensorProto.FLOAT)}


class _MeanFuser(Fuser):
    kind = "mean"

    def build(self, ctx):
        from onnx import TensorProto

        g, weights = ctx.g, ctx.defn.weights
        values = [ctx.value(i) for i in range(len(ctx.members))]
        mean = g.op("Div", [g.weighted_sum(weights, values), g.const(np.float64(total_weight(weights)), "total")])
        return {LABEL: g.op("Cast", [mean], to=TensorProto.FLOAT)}


class _MedianFuser(Fuser):
    kind = "median"

    def build(self, ctx):
        from onnx import TensorProto

        g, n = ctx.g, len(ctx.members)
        values = g.op("Concat", [ctx.value(i) for i in range(n)], axis=1)
        ordered = g.op("TopK", [values, g.const(np.array([n], dtype=np.int64), "k")], n_out=2, axis=1)[0]
        middle = g.op("Gather", [ordered, g.const(np.array([(n - 1) // 2, n // 2], dtype=np.int64), "middle")], axis=1)
        return {LABEL: g.op("Cast", [g.reduce("ReduceMean", middle, 1)], to=TensorProto.FLOAT)}


class _SammeFuser(Fuser):
    kind = "samme"

    def build(self, ctx):
        from onnx import TensorProto

        g, k = ctx.g, ctx.k
        if k < 2:
            raise ModelError(f"ensemble {ctx.defn.name}: samme needs at least 2 classes to fuse")
        weights = ctx.defn.weights
        pred = None
        for i, w in enumerate(weights):
            term = g.op("Where", [ctx.hits(i), g.const(np.float64(w), "alpha"),
                                  g.const(np.float64(-1 / (k - 1) * w), "alpha_miss")])
            pred = term if pred is None else g.op("Add", [pred, term])
        pred = g.op("Div", [pred, g.const(np.asarray(weights, dtype=np.float64).sum(), "alphas")])
        if k == 2:
            col = lambda j: g.op("Gather", [pred, g.const(np.array([j], dtype=np.int64))], axis=1)  # noqa: E731
            decision = g.op("Sub", [col(1), col(0)])  # [N, 1]
            index = g.op("Cast", [g.op("Greater", [decision, g.const(np.float64(0.0))])], to=TensorProto.INT64)
            index = g.op("Reshape", [index, g.const(np.array([-1], dtype=np.int64))])
            both = g.op("Concat", [g.op("Neg", [decision]), decision], axis=1)
            logits = g.op("Div", [both, g.const(np.float64(2.0))])
        else:
            index = g.op("ArgMax", [pred], axis=1, keepdims=0)
            logits = g.op("Div", [pred, g.const(np.float64(k - 1))])
        proba = g.op("Cast", [g.op("Softmax", [logits], axis=1)], to=TensorProto.FLOAT)
        return {LABEL: ctx.label_of(index), PROBABILITIES: proba}


class _AdditiveFuser(Fuser):
    kind = "additive"

    def build(self, ctx):
        from onnx import TensorProto

        g = ctx.g
        acc = g.const(np.float64(ctx.defn.combine.bias), "bias")
        for i, w in enumerate(ctx.defn.weights):
            acc = g.op("Add", [acc, g.op("Mul", [ctx.value(i), g.const(np.float64(w), "w")])])
        return {LABEL: g.op("Cast", [acc], to=TensorProto.FLOAT)}


class _MetaFuser(Fuser):
    """The members' outputs laid out as :func:`app.ensembles.combine.meta_features`, then the
    meta-learner's own graph (added by :func:`fuse` under the prefix ``meta_``)."""

    kind = "meta"

    def build(self, ctx):
        from onnx import TensorProto

        g, n = ctx.g, len(ctx.members)
        if ctx.defn.task == "classification" and ctx.defn.combine.meta_inputs == "probabilities":
            cols = [ctx.proba(i) for i in range(n)]
        elif ctx.defn.task == "classification":
            cols = [g.op("Cast", [ctx.index_col(i)], to=TensorProto.FLOAT) for i in range(n)]
        else:
            cols = [ctx.value(i, TensorProto.FLOAT) for i in range(n)]
        return {"features": g.op("Concat", cols, axis=1)}


FUSERS: dict[str, Fuser] = {f.kind: f for f in (
    _VoteFuser(), _SoftVoteFuser(), _MeanFuser(), _MedianFuser(), _SammeFuser(), _AdditiveFuser(), _MetaFuser())}


def _classes_fusable(defn: EnsembleDefinition) -> bool:
    if defn.task != "classification":
        return True
    classes = defn.classes or []
    ints = all(isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_)) for c in classes)
    return bool(classes) and (ints or all(isinstance(c, str) for c in classes))


def fusable(defn: EnsembleDefinition) -> bool:
    """Whether :func:`fuse` can make one graph of ``defn``: every member served as ONNX, a
    kind in ``FUSERS`` (meta: with its combiner.onnx), classes all integers or all strings."""
    return (
        all(m.runtime == "onnx" for m in defn.members)
        and defn.combine.kind in FUSERS
        and (defn.combine.kind != "meta" or defn.has_combiner)
        and _classes_fusable(defn)
    )


def _opsets(models: list[onnx.ModelProto]) -> dict[str, int]:
    versions: dict[str, int] = {"": MIN_OPSET}
    for model in models:
        for entry in model.opset_import:
            versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
    versions[ML_DOMAIN] = max(versions.get(ML_DOMAIN, 0), 2)  # LabelEncoder of string labels
    return versions


def _add_subgraph(g: _Graph, model: onnx.ModelProto, prefix: str, feed: str, main_opset: int) -> dict[str, str]:
    """Append ``model``'s graph with every name prefixed, its input fed from ``feed``; returns
    {original output name: prefixed name}."""
    import onnx
    from onnx import TensorProto, compose, version_converter

    own = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), main_opset)
    if own != main_opset:
        model = version_converter.convert_version(model, main_opset)
    model = compose.add_prefix(model, prefix)
    graph = model.graph
    initialized = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialized]
    if len(inputs) != 1:
        raise ModelError(f"{prefix.rstrip('_')}: a member must have one input, this one has {len(inputs)}")
    elem = inputs[0].type.tensor_type.elem_type
    if elem == TensorProto.FLOAT:
        g.nodes.append(onnx.helper.make_node("Identity", [feed], [inputs[0].name], name=g.name("feed")))
    else:
        g.nodes.append(onnx.helper.make_node("Cast", [feed], [inputs[0].name], name=g.name("feed"), to=elem))
    g.nodes.extend(graph.node)
    g.initializers.extend(graph.initializer)
    g.value_info.extend(graph.value_info)
    g.functions.extend(model.functions)
    return {o.name[len(prefix):]: o.name for o in graph.output}


def _member(model: onnx.ModelProto, names: dict[str, str], target: str) -> _Member:
    outputs = list(model.graph.output)
    label = next((o for o in outputs if o.name.lower().startswith("label")), outputs[0])
    proba = next((o for o in outputs if "prob" in o.name.lower() and o.name != label.name), None)
    meta = {p.key: p.value for p in model.metadata_props}
    return _Member(label=names[label.name], label_type=label.type.tensor_type.elem_type,
                   proba=names[proba.name] if proba is not None else None,
                   label_is_index=meta.get("matih.label_output") == "index", target=target)


def fuse(defn: EnsembleDefinition, member_models: list[onnx.ModelProto],
         combiner: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """One ONNX model of ``defn``: input ``input`` (float [N, n_features]), each member's graph
    under the prefix ``m<i>_``, the combine rule as ops; outputs ``label`` and, where the kind
    gives them, ``probabilities``. ModelError when ``defn`` is not :func:`fusable`."""
    import onnx
    from onnx import TensorProto, helper

    if not fusable(defn):
        raise ModelError(f"ensemble {defn.name} cannot be fused: members must all be ONNX, the kind one of "
                         f"{', '.join(FUSERS)} (meta with its meta-learner), classes all integers or all strings")
    if len(member_models) != len(defn.members):
        raise ModelError(
            f"ensemble {defn.name}: {len(member_models)} member models for {len(defn.members)} members")
    kind = defn.combine.kind
    models: list[onnx.ModelProto] = list(member_models)
    if kind == "meta":
        if combiner is None:
            raise ModelError(f"ensemble {defn.name}: fusing a meta-learner ensemble needs the meta-learner's ONNX")
        models.append(combiner)
    opsets = _opsets(models)
    g = _Graph(opsets[""])
    n_features = defn.n_features or _width(member_models[0])

    members = []
    for i, (model, m) in enumerate(zip(member_models, defn.members)):
        names = _add_subgraph(g, model, f"m{i}_", INPUT, g.opset)
        members.append(_member(model, names, m.target))
    ctx = _Context(g, defn, members)
    outs = FUSERS[kind].build(ctx)

    label_type: int = TensorProto.STRING if all(isinstance(c, str) for c in ctx.classes) else TensorProto.INT64
    if kind == "meta":
        names = _add_subgraph(g, models[-1], "meta_", outs.pop("features"), g.opset)
        meta = _member(models[-1], names, "meta-learner")
        label_type = meta.label_type
        label = meta.label
        if defn.task == "regression":
            label = g.op("Cast", [g.op("Reshape", [label, g.const(np.array([-1, 1], dtype=np.int64))])],
                         to=TensorProto.FLOAT)
        outs[LABEL] = label
        if meta.proba is not None and defn.task == "classification":
            outs[PROBABILITIES] = g.op("Cast", [meta.proba], to=TensorProto.FLOAT)

    graph_outputs = []
    for name, tensor in outs.items():
        g.nodes.append(helper.make_node("Identity", [tensor], [name], name=g.name(f"out_{name}")))
    if defn.task == "classification":
        graph_outputs.append(helper.make_tensor_value_info(LABEL, label_type, [None]))
        if PROBABILITIES in outs:
            graph_outputs.append(helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [None, ctx.k]))
    else:
        graph_outputs.append(helper.make_tensor_value_info(LABEL, TensorProto.FLOAT, [None, 1]))

    graph = helper.make_graph(
        g.nodes, f"{defn.name}_fused",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [None, n_features])],
        graph_outputs, initializer=g.initializers, value_info=g.value_info,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
        producer_name="matih-ml", doc_string=f"ensemble {defn.name} ({kind}) fused: {len(members)} members",
    )
    model.ir_version = max([m.ir_version for m in models] + [8])
    model.functions.extend(g.functions)
    for key, value in (("matih.ensemble", defn.name), ("matih.combine", kind)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model


def _width(model: onnx.ModelProto) -> int | None:
    initialized = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in initialized)
    dims = inp.type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) == 2 and dims[1].dim_value else None


def check_parity(fused_bytes: bytes, local: LocalEnsemble, X: np.ndarray, tolerance: float = 1e-4) -> float:
    """The fused graph against the fan-out it replaces (``local``) on ``X``: labels must agree
    row for row, and the largest |difference| over probabilities (classifiers) or predictions
    (regressors) must be within ``tolerance``. Returns that difference; ModelError otherwise."""
    import onnxruntime as ort

    X = np.ascontiguousarray(X, dtype=np.float32)
    sess = ort.InferenceSession(fused_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {INPUT: X})))
    expected = local.predict(X)
    defn = local.defn
    got = np.asarray(outs[LABEL])
    if defn.task == "classification":
        got_labels = got.reshape(-1).tolist()
        wrong = [j for j, (a, b) in enumerate(zip(got_labels, expected["predictions"])) if a != b]
        if wrong or len(got_labels) != len(expected["predictions"]):
            j = wrong[0] if wrong else 0
            raise ModelError(f"fused ensemble {defn.name}: labels differ from the fan-out on {len(wrong)} of "
                             f"{len(X)} rows (row {j}: {got_labels[j]!r} vs {expected['predictions'][j]!r})")
        diff = 0.0
        if "probabilities" in expected:
            if PROBABILITIES not in outs:
                raise ModelError(f"fused ensemble {defn.name} has no probability output; the fan-out gives one")
            diff = float(np.max(np.abs(np.asarray(outs[PROBABILITIES], dtype=np.float64)
                                       - np.asarray(expected["probabilities"], dtype=np.float64)), initial=0.0))
    else:
        diff = float(np.max(np.abs(got.reshape(-1).astype(np.float64)
                                   - np.asarray(expected["predictions"], dtype=np.float64)), initial=0.0))
    if diff > tolerance:
        raise ModelError(f"fused ensemble {defn.name} differs from the fan-out by {diff:.3g} "
                         f"(tolerance {tolerance:g})", details={"max_abs_diff": diff})
    return diff

"""Model cards (JSON and Markdown) and the side-by-side comparison of versions."""

from __future__ import annotations

import json
from typing import Any

from app.errors import InvalidInput
from app.registry import formats as F
from app.registry.base import RegistryBase
from app.registry.checks import check_version
from app.registry.mlflow_registry import TAG_PARITY, TAG_VALIDATION_REPORT

#: On an ensemble version: JSON of the holdout metrics of the ensemble and of each member, whether
#: it beats its best member, and whether a fused graph exists (written by app.ensembles.registry).
TAG_ENSEMBLE_REPORT = "matih.ensemble_report"


def ensemble_section(tags: dict[str, str]) -> dict[str, Any] | None:
    """The card's ``ensemble`` section of an ensemble version (None for other versions): method,
    combine rule, members with their pins, weights and holdout metrics, the ensemble's metrics,
    whether it beats its best member (by the task's main metric), and whether it is fused."""
    from app.ensembles.definition import DEFINITION_TAG, KIND_TAG

    if tags.get(KIND_TAG) != "ensemble" or DEFINITION_TAG not in tags:
        return None
    defn = json.loads(tags[DEFINITION_TAG])
    try:
        report = json.loads(tags.get(TAG_ENSEMBLE_REPORT) or "{}")
    except ValueError:
        report = {}
    member_metrics = report.get("member_metrics") or []
    members = [
        {"ref": m.get("ref") or f"{m['name']}/{m['version']}", "name": m["name"], "version": m["version"],
         "weight": m["weight"], "runtime": m.get("runtime"),
         "metrics": member_metrics[i] if i < len(member_metrics) else None}
        for i, m in enumerate(defn["members"])
    ]
    return {
        "method": defn["method"],
        "combine": defn["combine"]["kind"],
        "members": members,
        "metrics": report.get("metrics"),
        "main_metric": report.get("main_metric"),
        "beats_best_member": report.get("beats_best_member"),
        "fused": bool(report.get("fused")),
        "policy": defn.get("policy"),
    }


class CardsMixin(RegistryBase):
    """Model cards and comparisons of versions."""

    def card(self, name: str, version: str | int) -> dict[str, Any]:
        v = self.get_version(name, version)
        tags = v["tags"]
        trust, approved = self._grants(name)  # the metadata store's records, not the mirror tags
        approvals = [{"by": a["by"], "at": a["at"], "comment": a["comment"], "sha256": a["sha256"]}
                     for a in approved.get(v["version"], [])]
        record = trust.get(v["version"]) if v["trusted"] else None
        parity = tags.get(TAG_PARITY)
        return {
            "name": v["name"],
            "version": v["version"],
            "description": v["description"],
            "intended_use": v["intended_use"],
            "task": v["task"],
            "metrics": v["metrics"],
            "params": v["params"],
            "data": {
                "dataset_uri": v["lineage"]["dataset_uri"],
                "dataset_sha256": v["lineage"]["dataset_sha256"],
                "feature_names": v["feature_names"],
                "classes": v["classes"],
                # a feast:// dataset: {name, project, version, features: ["view:feature", ...], view_versions}
                "feature_service": v["lineage"].get("feature_service"),
            },
            "signature": v["signature"],
            "lineage": v["lineage"],
            "format": v["format"],
            "formats": v["formats"],
            "parity": {
                "onnx_max_abs_diff": float(parity) if parity else None,
                "validation": v["validation"],
                "detail": tags.get(F.TAG_VALIDATION_DETAIL),
            },
            "validation": json.loads(tags[TAG_VALIDATION_REPORT]) if TAG_VALIDATION_REPORT in tags else None,
            "stage": v["stage"],
            "aliases": v["aliases"],
            "approvals": approvals,
            "trusted": v["trusted"],
            "trusted_by": record["trusted_by"] if record else None,
            "trusted_sha256": record["sha256"] if record else None,
            "ensemble": ensemble_section(tags),
        }

    def compare(self, name: str, versions: list[str]) -> dict[str, Any]:
        if not 2 <= len(versions) <= 10:
            raise InvalidInput(
                f"compare takes 2 to 10 versions (got {len(versions)}): ?versions=1,2", details={"field": "versions"}
            )
        versions = [check_version(v) for v in versions]
        rows = [self.get_version(name, v, detail=False) for v in versions]
        runs = {r["version"]: self._run(r["run_id"]) for r in rows}
        metrics: dict[str, dict[str, float | None]] = {}
        params: dict[str, dict[str, str | None]] = {}
        for r in rows:
            run = runs[r["version"]]
            for k, val in (run.data.metrics if run else {}).items():
                metrics.setdefault(k, {})[r["version"]] = val
            for k, val in (run.data.params if run else {}).items():
                params.setdefault(k, {})[r["version"]] = val
        for table in (metrics, params):
            for values in table.values():
                for v in versions:
                    values.setdefault(v, None)
        return {
            "name": name,
            "versions": versions,
            "metrics": dict(sorted(metrics.items())),
            "params": dict(sorted(params.items())),
            "differing_params": sorted(k for k, vals in params.items() if len(set(vals.values())) > 1),
            "summary": {
                r["version"]: {k: r[k] for k in ("format", "stage", "validation", "aliases", "approved_by", "run_id")}
                for r in rows
            },
        }


def card_markdown(card: dict[str, Any]) -> str:
    """The model card as Markdown, for people and for the MLflow version description."""
    lines = [f"# {card['name']} version {card['version']}", ""]
    if card["description"]:
        lines += [card["description"], ""]
    lines += ["## Intended use", "", card["intended_use"] or "_not stated_", ""]
    lines += ["## Metrics", ""]
    lines += [f"- {k}: {v:.6g}" for k, v in sorted(card["metrics"].items())] or ["_none recorded_"]
    lines += ["", "## Parameters", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(card["params"].items())] or ["_none recorded_"]
    data = card["data"]
    lines += ["", "## Data", "", f"- dataset: {data['dataset_uri'] or 'unknown'}",
              f"- sha256: {data['dataset_sha256'] or 'unknown'}"]
    service = data.get("feature_service")
    if service:
        lines += ["", "## Features", "", f"- feature service: {service.get('name')} (project {service.get('project')}, "
                  f"version {service.get('version')})"] + [f"- {ref}" for ref in service.get("features") or []]
    lin = card["lineage"]
    lines += ["", "## Lineage", ""] + [f"- {k}: {v}" for k, v in lin.items() if v and k != "feature_service"]
    parity = card["parity"]
    lines += ["", "## Format and validation", "", f"- format: {card['format']} (artifacts: {', '.join(card['formats'])})",
              f"- validation: {parity['validation']}" + (f" ({parity['detail']})" if parity["detail"] else "")]
    report = card.get("validation")
    if report:
        champ = report.get("champion") or {}
        lines += ["", "## Validation gates", "",
                  f"- holdout: {', '.join(f'{k} {v:.4g}' for k, v in (report.get('metrics') or {}).items())}",
                  f"- compared with: version {champ['version']}" if champ else "- compared with: no champion"]
        lines += [f"- {g['metric']} {g['rule']}: {'passed' if g['passed'] else 'FAILED'} ({g['note']})"
                  for g in report.get("gates") or []]
    ens = card.get("ensemble")
    if ens:
        beats = {True: "yes", False: "no", None: "not scored"}[ens["beats_best_member"]]
        lines += ["", "## Ensemble", "", f"- method: {ens['method']} (combine: {ens['combine']})",
                  f"- fused ONNX graph: {'yes' if ens['fused'] else 'no'}",
                  f"- beats its best member ({ens['main_metric'] or 'main metric'}): {beats}"]
        for m in ens["members"]:
            scored = ", ".join(f"{k} {v:.4g}" for k, v in (m["metrics"] or {}).items()) or "not scored"
            lines.append(f"- member {m['ref']} -> {m['name']}/{m['version']} (weight {m['weight']:g}): {scored}")
    lines += ["", "## Stage and approvals", "", f"- stage: {card['stage']}",
              f"- aliases: {', '.join(card['aliases']) or 'none'}"]
    lines += [f"- approved by {a['by']} at {a['at']}" + (f": {a['comment']}" if a["comment"] else "")
              for a in card["approvals"]] or ["- not approved"]
    return "\n".join(lines) + "\n"


"""The model registry API's logic over MLflow's own client: registered models, versions,
aliases, stages and approvals, trust, conversion, model cards, and tracking reads.

MLflow is the registry, not a copy: everything here is read from and written to MLflow
(descriptions, tags, aliases, runs, artifacts), so MLflow's UI and client show the same
state. Tags written by the platform start with ``matih.``; callers may not set those.

Every mutation records an audit entry in the metadata store (who, what, before, after).
The HTTP layer (``app/api/registry.py``) adds roles and cache invalidation.

The service is split by concern; ``RegistryService`` is their composition:

- ``app/registry/checks.py``: name, version, alias and tag checks;
- ``app/registry/base.py``: MLflow errors as ours, the audit hook, the version view, ``matih.*`` tags;
- ``app/registry/models.py``: registered models, version reads and edits;
- ``app/registry/registration.py``: every way a version is created (``_create_version``), conversion;
- ``app/registry/lifecycle.py``: aliases, stages, approval and trust (the stage rules);
- ``app/registry/cards.py``: model cards and comparison;
- ``app/registry/tracking.py``: experiments and runs.
"""

from __future__ import annotations

from app.registry.base import (
    TAG_APPROVAL_COMMENT,
    TAG_APPROVED_AT,
    TAG_CONVERTED_FROM,
    TAG_INTENDED_USE,
    TAG_REGISTERED_BY,
    TAG_SHA256,
    TAG_SOURCE,
    TAG_SOURCE_KIND,
    TAG_TRUSTED_AT,
    TAG_TRUSTED_BY,
)
from app.registry.cards import CardsMixin, card_markdown
from app.registry.checks import check_alias, check_model_name, check_user_tags, check_version
from app.registry.lifecycle import STAGE_ALIASES, STAGES, LifecycleMixin
from app.registry.models import ModelsMixin, endpoints_using
from app.registry.registration import RegistrationMixin
from app.registry.tracking import TrackingMixin

__all__ = [
    "RegistryService",
    "STAGES",
    "STAGE_ALIASES",
    "TAG_APPROVAL_COMMENT",
    "TAG_APPROVED_AT",
    "TAG_CONVERTED_FROM",
    "TAG_INTENDED_USE",
    "TAG_REGISTERED_BY",
    "TAG_SHA256",
    "TAG_SOURCE",
    "TAG_SOURCE_KIND",
    "TAG_TRUSTED_AT",
    "TAG_TRUSTED_BY",
    "card_markdown",
    "check_alias",
    "check_model_name",
    "check_user_tags",
    "check_version",
    "endpoints_using",
]


class RegistryService(ModelsMixin, RegistrationMixin, LifecycleMixin, CardsMixin, TrackingMixin):
    """The registry API's logic: one per process (``RegistryService(settings, registry, store)``);
    ``store`` receives the audit log."""

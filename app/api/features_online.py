"""Feature store routes: online reads (app/features). Being built."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.app import ApiContext


def router(ctx: ApiContext) -> APIRouter:
    return APIRouter(prefix="/v1/features", tags=["features"])

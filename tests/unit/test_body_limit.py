"""The body size limit holds for bodies without a content-length too (chunked): 413, not the
400 FastAPI makes of an error raised while it reads the body."""

import asyncio

import httpx
from fastapi import FastAPI

from app.api.app import BodySizeLimit


def _app(limit: int) -> FastAPI:
    api = FastAPI()

    @api.post("/echo")
    async def echo(body: list[int]):  # a body parameter: FastAPI reads and parses the body itself
        return {"n": len(body)}

    api.add_middleware(BodySizeLimit, limit=limit)
    return api


def test_bodies_over_the_limit_get_413_with_or_without_content_length():
    big = b"[" + b"1," * 600 + b"1]"

    async def chunks():
        for i in range(0, len(big), 100):
            yield big[i: i + 100]

    async def main():
        transport = httpx.ASGITransport(app=_app(1000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return (
                await c.post("/echo", content=big, headers={"content-type": "application/json"}),
                await c.post("/echo", content=chunks(), headers={"content-type": "application/json"}),
                await c.post("/echo", json=[1, 2, 3]),
            )

    sized, chunked, small = asyncio.run(main())
    for r in (sized, chunked):
        assert r.status_code == 413, r.text
        assert r.json()["code"] == "payload_too_large"
    assert small.status_code == 200 and small.json() == {"n": 3}

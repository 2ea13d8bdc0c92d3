"""client_job_id rules, ResponseMetadata headers, request ids, and the error envelope."""

import asyncio

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field

from hrserve import (
    RequestIdMiddleware,
    ResponseMetadata,
    ServiceError,
    client_job_id,
    install_error_handlers,
    validate_client_job_id,
)


@pytest.mark.parametrize("value", ["job-1", "a.b:c_d-e", "x" * 128])
def test_valid_client_job_ids(value):
    assert validate_client_job_id(value, None) == value
    assert validate_client_job_id(None, value) == value


@pytest.mark.parametrize("value", ["", "x" * 129, "a b", "a\nb", "a\x00b", "é", "a;b", "../etc"])
def test_invalid_client_job_ids(value):
    with pytest.raises(ServiceError) as exc:
        validate_client_job_id(value, None)
    assert exc.value.status == 400
    assert exc.value.param == "client_job_id"


def test_header_and_query_must_agree():
    assert validate_client_job_id(None, None) is None
    assert validate_client_job_id("same", "same") == "same"
    with pytest.raises(ServiceError, match="differ"):
        validate_client_job_id("one", "two")


def test_response_metadata_headers():
    meta = ResponseMetadata("a" * 32, "b" * 16, "job")
    assert meta.headers() == {"X-Trace-ID": "a" * 32, "X-Span-ID": "b" * 16, "X-Client-Job-ID": "job"}
    assert ResponseMetadata().headers() == {}


class Body(BaseModel):
    n: int = Field(ge=1)


def make_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(body: Body, job: str | None = Depends(client_job_id)) -> dict:
        return {"n": body.n, "job": job}

    @app.get("/teapot")
    async def teapot() -> dict:
        raise ServiceError(418, "short and stout", "invalid_request_error", "teapot", "tea")

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internal detail")

    return app


def call(method: str, url: str, **kw) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=make_app(), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, url, **kw)

    return asyncio.run(go())


def test_validation_error_is_400_with_param():
    r = call("POST", "/echo", json={"n": 0})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "n"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_service_error_envelope():
    r = call("GET", "/teapot")
    assert r.status_code == 418
    assert r.json() == {
        "error": {"message": "short and stout", "type": "invalid_request_error", "param": "tea", "code": "teapot"}
    }


def test_unexpected_error_is_generic_500():
    r = call("GET", "/boom")
    assert r.status_code == 500
    assert "secret" not in r.text
    assert r.json()["error"]["type"] == "server_error"


def test_request_id_echoed_or_made():
    r = call("POST", "/echo", json={"n": 1}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = call("POST", "/echo", json={"n": 1}, headers={"X-Request-ID": "bad value\x01"})
    assert r.headers["x-request-id"] != "bad value\x01" and len(r.headers["x-request-id"]) == 32


def test_client_job_id_dependency():
    r = call("POST", "/echo?client_job_id=j1", json={"n": 1})
    assert r.json() == {"n": 1, "job": "j1"}
    r = call("POST", "/echo", json={"n": 1}, headers={"X-Client-Job-ID": "bad id"})
    assert r.status_code == 400

"""Errors in the dialect of the route's router: its body from handler, validation and middleware errors alike
(middleware runs before routing), OpenAI's elsewhere, and /openapi.json naming each route's envelope."""

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from hrserve import (
    OPENAI,
    Dialect,
    DialectRouter,
    ServiceError,
    document_errors,
    include_router,
    install_error_handlers,
)
from hrserve.limits import BodyLimitMiddleware

PLAIN = Dialect("PlainError", {"type": "object"}, lambda e: {"failed": e.message}, key_header="x-key")


class Body(BaseModel):
    n: int


def app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=64)
    plain = DialectRouter(PLAIN)

    @plain.post("/v1/plain")
    async def plain_route(body: Body) -> dict:
        raise ServiceError(409, "taken")

    @app.post("/v1/default")
    async def default_route(body: Body) -> dict:
        raise ServiceError(409, "taken")

    include_router(app, plain)
    document_errors(app)
    return app


def test_each_route_answers_in_its_routers_dialect():
    client = TestClient(app())
    assert client.post("/v1/plain", json={"n": 1}).json() == {"failed": "taken"}
    assert client.post("/v1/plain", json={}).json() == {"failed": "Invalid value for 'n': Field required"}
    assert client.get("/v1/plain").json() == {"failed": "Method Not Allowed"}
    # The body limit answers before any route runs, and still in the route's dialect.
    assert client.post("/v1/plain", content=b"x" * 100).json()["failed"].startswith("The request body is over")
    assert client.post("/v1/default", json={"n": 1}).json()["error"]["message"] == "taken"
    assert client.post("/v1/default", content=b"x" * 100).json()["error"]["code"] == "request_too_large"


def test_openapi_names_each_routes_envelope():
    schema = app().openapi()
    ref = schema["paths"]["/v1/plain"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/PlainError"
    ref = schema["paths"]["/v1/default"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == f"#/components/schemas/{OPENAI.name}"

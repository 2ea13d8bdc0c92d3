"""A request body size limit: larger bodies get 413 before the app reads them into memory."""

from starlette.exceptions import HTTPException

from hrserve.errors import ServiceError, send_error


class BodyTooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException, so FastAPI's body parsing lets it through."""

    code = "request_too_large"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _message(max_bytes))


def _message(max_bytes: int) -> str:
    return f"The request body is over the limit of {max_bytes} bytes; send less or raise the limit."


class BodyLimitMiddleware:
    """Pure ASGI: refuses a body over `max_bytes`, by its Content-Length or, when chunked, as it arrives."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send, scope)
            return
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, send, scope) -> None:
        await send_error(send, ServiceError(413, _message(self.max_bytes), code=BodyTooLarge.code), scope)

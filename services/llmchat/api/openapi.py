"""What /openapi.json says a generating route answers with 200: the official SDK's model of the whole response
as JSON, or with `stream: true` server-sent events whose `data` is the JSON of the SDK's event models.

OpenAPI 3.1 has no place for one stream event's schema, so the text/event-stream entry's `schema` describes one
event ({event, data}), as schemathesis reads it; `data` is a string whose JSON content (contentMediaType and
contentSchema) is the SDK's chunk or event union, or the route's error envelope.
"""

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema


def component(name: str) -> dict:
    """A reference to a schema under /openapi.json's components."""
    return {"$ref": f"#/components/schemas/{name}"}


@dataclass(frozen=True, slots=True)
class JsonText:
    """Marks a field that goes out as JSON text (an event's `data`): its schema is a string whose JSON content
    is the annotated type, or one of the schemas `components` names (an error envelope from hrserve, which
    pydantic does not generate)."""

    components: tuple[str, ...] = ()

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        content = handler(core_schema)
        if self.components:
            content = {"anyOf": [content, *map(component, self.components)]}
        return {"type": "string", "contentMediaType": "application/json", "contentSchema": content}


@dataclass(frozen=True, slots=True)
class WithEvents:
    """Makes a stream's event model a component beside the whole response's model. FastAPI documents one model
    per status, so the event model rides along in the same schema generation: it shares the names given to the
    SDK's models (clashes between them and the request models are resolved once) and keeps its class name."""

    event: type[BaseModel]

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        handler(self.event.__pydantic_core_schema__)
        return handler(core_schema)


def ok_responses(description: str, body: type[BaseModel], event: type[BaseModel]) -> dict:
    """The OpenAPI 200 of a generating route: `body` as JSON, or with `stream: true` `event`s."""
    return {
        200: {
            "description": description,
            "model": Annotated[body, WithEvents(event)],
            "content": {"text/event-stream": {"schema": component(event.__name__)}},
        }
    }

"""The wire protocols: one adapter per protocol (OpenAI chat, completions and Responses; Anthropic Messages),
each a request mapper (wire request -> ChatRequest) and a reply builder (ChatEvents -> the whole response or
its server-sent events), served by the one route lifecycle in serving.py and documented in /openapi.json with
the official SDKs' models (openapi.py)."""

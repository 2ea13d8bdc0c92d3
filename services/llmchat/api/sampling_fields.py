"""The sampling and output fields OpenAI's chat and completions requests share with vLLM's extras, and the
fields of either that this server does not honor: each is applied, or refused by name, never dropped.

vLLM's extras arrive at the top level of the body (the OpenAI SDK's `extra_body`), so they are fields here.
"""

import json
from typing import Any

from pydantic import BaseModel

from llmchat.api.common import json_output
from llmchat.api.openai_types import SamplingFields
from llmchat.chat import ChatError, ChatRequest
from llmchat.chat.grammar import GrammarError, structured_grammar
from llmchat.chat.request import Sampling

# Fields that change nothing this server generates: accepted (and logged as unknown when they are).
IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "safety_identifier",
        "prediction",  # Predicted Outputs only speed a reply up; the reply is the same
        "guided_decoding_backend",
        "priority",
        "request_id",
        "cache_salt",
    }
)

# Fields that would change what is generated and are not implemented, with the values that change nothing
# (absent or one of these is accepted; anything else is a 400 naming the field).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "audio": (None,),
    "modalities": (None, ["text"]),
    "functions": (None, []),
    "function_call": (None, "none"),
    "moderation": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "prompt_embeds": (None,),
    "add_special_tokens": (None,),
    "continue_final_message": (None, False),
    "add_generation_prompt": (None, True),
    "documents": (None,),
    "chat_template": (None,),
    "mm_processor_kwargs": (None,),
    "structural_tag": (None,),
    "guided_whitespace_pattern": (None,),
    "logits_processors": (None,),
    "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
}
HINTS = {
    "functions": "send tools instead",
    "function_call": "send tool_choice instead",
    "modalities": "this server's model writes text only",
    "audio": "this server's model writes text only",
    "use_beam_search": "this server samples; send n for several candidates",
}


def apply_sampling(
    body: SamplingFields, request: ChatRequest, refused: dict[str, tuple[Any, ...]] | None = None
) -> None:
    """Sets the request's n, top_k, penalties, bias and output options from the body; refuses what this server
    does not honor (and the route's own `refused` fields), naming the field."""
    refuse_unsupported(body, refused)
    request.n = body.n
    request.top_k = 0 if body.top_k in (None, -1) else body.top_k
    request.sampling = Sampling(
        min_p=body.min_p,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=_bias(body.logit_bias or {}),
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        allowed_token_ids=tuple(body.allowed_token_ids or ()),
        bad_words=tuple(body.bad_words or ()),
        include_stop=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
    )
    if request.max_tokens is not None and body.min_tokens > request.max_tokens:
        raise ChatError(f"min_tokens ({body.min_tokens}) is more than max_tokens ({request.max_tokens}).", "min_tokens")


def refuse_unsupported(body: BaseModel, more: dict[str, tuple[Any, ...]] | None = None) -> None:
    """`more`: a route's own refused fields (vLLM's chat `echo`, which repeats the last message)."""
    extra = body.model_extra or {}
    for name, harmless in (UNSUPPORTED | (more or {})).items():
        if name in extra and extra[name] not in harmless:
            hint = HINTS.get(name, "leave it out")
            raise ChatError(f"{name} is not supported by this server; {hint}.", name)


def _bias(bias: dict[str, float]) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise ChatError(f"logit_bias keys are token ids; {key!r} is not one.", f"logit_bias.{key}") from None
    return out


def structured_output(body: SamplingFields) -> tuple[str, str, Any] | None:
    """(field, kind, value) of the one structured output the body asks for (json, regex, choice or grammar),
    from structured_outputs or the older guided_* fields; None when none. Two at once is a 400."""
    asked: list[tuple[str, str, Any]] = []
    so = body.structured_outputs
    if so is not None:
        for kind, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice), ("grammar", so.grammar)):
            if value is not None:
                asked.append((f"structured_outputs.{kind}", kind, value))
        if so.json_object:
            asked.append(("structured_outputs.json_object", "json", None))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{kind}")
        if value is not None:
            asked.append((f"guided_{kind}", kind, value))
    if len(asked) > 1:
        names = ", ".join(a[0] for a in asked)
        raise ChatError(f"Ask for one structured output at a time; the request sets {names}.", asked[1][0])
    return asked[0] if asked else None


def check_structured(field: str, kind: str, value: Any) -> None:
    """A regex, choice list or grammar that does not compile is a 400 with llguidance's message."""
    try:
        structured_grammar(kind, value)
    except GrammarError as exc:
        raise ChatError(f"{field} cannot be enforced: {exc}", field) from None


def apply_structured(body: SamplingFields, request: ChatRequest) -> None:
    """Sets the structured output the body asks for: JSON as response_format sets it, the other kinds as a
    grammar checked now."""
    asked = structured_output(body)
    if asked is None:
        return
    field, kind, value = asked
    if request.json_output:
        raise ChatError(f"{field} cannot be combined with response_format; send one of them.", field)
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ChatError(f"{field} must be a JSON Schema (an object, or its JSON text).", field) from None
        json_output(request, value, field, field)
        return
    if request.uses_tools:
        raise ChatError(f"{field} cannot be combined with tools; send tool_choice 'none' or drop {field}.", field)
    check_structured(field, kind, value)
    request.structured = (kind, value)

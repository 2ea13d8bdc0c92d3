"""Tool replies on public function-calling data: prompts and function schemas from the Berkeley Function
Calling Leaderboard (the `bfcl-eval` package's data files; `bin/sync` installs it without its dependencies),
asked with tool_choice required, named (the expected function) and auto, greedy, max_tokens 200 by default.
BFCL's irrelevance category (no offered tool fits the question) is asked with auto alone, as mode
"auto, irrelevant": the right reply there is a plain answer, no call.

A reply is whole when it ends with finish_reason tool_calls and every call names an offered tool, has
arguments that are JSON and valid against that tool's schema, and differs from the reply's other calls.
Also reported: replies cut by max_tokens, replies holding the same call twice, replies whose first call
names the expected function, and completion tokens per reply.
"""

import asyncio
import importlib.util
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import jsonschema
from rich.console import Console

from bench import servers
from bench.report import table

CATEGORIES = (
    "simple_python",
    "simple_java",
    "simple_javascript",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
)
MODES = ("required", "named", "auto")
IRRELEVANT = "irrelevance"
# BFCL writes Python, Java and JavaScript type names; the JSON Schema type each stands for (None: any value).
TYPES = {
    "dict": "object",
    "HashMap": "object",
    "float": "number",
    "double": "number",
    "long": "integer",
    "tuple": "array",
    "Array": "array",
    "ArrayList": "array",
    "String": "string",
    "char": "string",
    "Boolean": "boolean",
    "any": None,
    "": None,
}


@dataclass
class Case:
    id: str
    category: str
    messages: list[dict]
    tools: list[dict]
    expected: str  # the function the data set's answer calls first


@dataclass
class ReplyResult:
    server: str
    mode: str
    category: str
    id: str
    status: int
    finish_reason: str | None
    num_calls: int
    whole: bool  # ends with tool_calls; every call complete, distinct and schema-valid
    cut: bool  # a call's arguments are not JSON
    repeated: bool  # two calls with the same name and arguments
    invalid: bool  # a call's arguments break its schema, or it names no offered tool
    first_expected: bool
    completion_tokens: int
    error: str = ""
    plain: bool = False  # answered (200) without a call


def data_dir() -> Path | None:
    """The data folder of the installed bfcl-eval, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def json_schema(schema: dict) -> dict:
    """A BFCL parameter schema as JSON Schema: its type names mapped, its non-standard `optional` dropped."""
    out = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            value = TYPES.get(value, value)
            if value is None:
                continue
        elif key == "properties":
            value = {name: json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            value = json_schema(value)
        elif key == "optional":
            continue
        out[key] = value
    return out


def load_cases(per_category: int) -> list[Case]:
    """`per_category` entries from each category, evenly spread over it (the same ones every run)."""
    root = data_dir()
    cases = []
    for category in CATEGORIES:
        entries = [json.loads(line) for line in (root / f"BFCL_v4_{category}.json").open()]
        answers = {}
        for line in (root / "possible_answer" / f"BFCL_v4_{category}.json").open():
            answer = json.loads(line)
            answers[answer["id"]] = next(iter(answer["ground_truth"][0]))
        for entry in spread(entries, per_category):
            cases.append(Case(entry["id"], category, entry["question"][0], bfcl_tools(entry), answers[entry["id"]]))
    irrelevant = [json.loads(line) for line in (root / f"BFCL_v4_{IRRELEVANT}.json").open()]
    for entry in spread(irrelevant, per_category):
        cases.append(Case(entry["id"], IRRELEVANT, entry["question"][0], bfcl_tools(entry), ""))
    return cases


def spread(entries: list, count: int) -> list:
    """`count` of the entries, evenly spread over them."""
    return entries[:: max(len(entries) // count, 1)][:count]


def bfcl_tools(entry: dict) -> list[dict]:
    """An entry's functions as OpenAI tools."""
    return [
        {
            "type": "function",
            "function": {
                "name": f["name"],
                "description": f.get("description", ""),
                "parameters": json_schema(f["parameters"]),
            },
        }
        for f in entry["function"]
    ]


def request_body(case: Case, mode: str, model: str, max_tokens: int) -> dict:
    choice = {"type": "function", "function": {"name": case.expected}} if mode == "named" else mode
    return {
        "model": model,
        "messages": case.messages,
        "tools": case.tools,
        "tool_choice": choice,
        "temperature": 0,
        "max_tokens": max_tokens,
    }


def score(server: str, case: Case, mode: str, status: int, body: dict) -> ReplyResult:
    mode = f"{mode}, irrelevant" if case.category == IRRELEVANT else mode
    result = ReplyResult(server, mode, case.category, case.id, status, None, 0, False, False, False, False, False, 0)
    if status != 200:
        result.error = str(body.get("error", body))[:200]
        return result
    choice = body["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in case.tools}
    keys = []
    for call in calls:
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            result.cut = True
            continue
        keys.append((name, json.dumps(value, sort_keys=True)))
        try:
            jsonschema.validate(value, schemas[name])
        except (KeyError, jsonschema.ValidationError):
            result.invalid = True
    result.finish_reason = choice["finish_reason"]
    result.num_calls = len(calls)
    result.plain = not calls
    result.repeated = len(set(keys)) < len(keys)
    result.first_expected = bool(calls) and calls[0]["function"]["name"] == case.expected
    result.whole = (
        result.finish_reason == "tool_calls" and bool(calls) and not (result.cut or result.repeated or result.invalid)
    )
    result.completion_tokens = (body.get("usage") or {}).get("completion_tokens", 0)
    return result


async def ask_all(
    server: servers.Server, cases: list[Case], max_tokens: int, concurrency: int, timeout_s: float
) -> list[ReplyResult]:
    work = [(case, mode) for mode in MODES for case in cases if case.category != IRRELEVANT]
    work += [(case, "auto") for case in cases if case.category == IRRELEVANT]
    results: list[ReplyResult] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while work:
            case, mode = work.pop(0)
            body = request_body(case, mode, server.model, max_tokens)
            try:
                response = await asyncio.wait_for(client.post("/v1/chat/completions", json=body), timeout_s)
            except TimeoutError:
                # A server that ignores max_tokens (llama-cpp-python's tool path) would hold the run for minutes.
                results.append(score(server.name, case, mode, 0, {"error": f"no reply within {timeout_s:.0f} s"}))
                continue
            try:
                answer = response.json()
            except ValueError:
                answer = {"error": response.text}
            results.append(score(server.name, case, mode, response.status_code, answer))

    async with httpx.AsyncClient(base_url=server.base_url, timeout=None) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def add_arguments(parser) -> None:
    parser.add_argument("--tools-per-category", type=int, default=12, help="BFCL entries per category (8 of them)")
    parser.add_argument("--tools-max-tokens", type=int, default=200)
    parser.add_argument("--tools-concurrency", type=int, default=4)
    parser.add_argument("--tools-timeout", type=float, default=90, help="seconds a reply may take (else an error)")


def run(server: servers.Server, args, console: Console) -> list[ReplyResult]:
    if data_dir() is None:
        console.print("[yellow]tools: bfcl-eval is not installed (bin/sync installs it); skipped[/yellow]")
        return []
    cases = load_cases(args.tools_per_category)
    results = asyncio.run(ask_all(server, cases, args.tools_max_tokens, args.tools_concurrency, args.tools_timeout))
    whole = sum(r.whole for r in results)
    console.print(f"  {server.name} tools: {whole}/{len(results)} whole replies")
    return results


def share(rows: list[ReplyResult], attr: str) -> str:
    return f"{100 * sum(getattr(r, attr) for r in rows) / len(rows):.0f}%" if rows else "-"


def report(rows: list[ReplyResult], args, console: Console, out: Path) -> None:
    title = f"Tool replies on BFCL prompts (greedy, max_tokens {args.tools_max_tokens})"
    columns = ("server", "tool_choice", "replies", "whole", "tool_calls", "cut", "repeated", "invalid")
    t = table(title, (*columns, "expected 1st", "no call", "errors", "tokens/reply"))
    for (server, mode), group in _groups(rows).items():
        answered = [r for r in group if r.status == 200]
        tokens = statistics.mean(r.completion_tokens for r in answered) if answered else 0
        ended = sum(r.finish_reason == "tool_calls" for r in group)
        t.add_row(
            server,
            mode,
            str(len(group)),
            share(group, "whole"),
            f"{100 * ended / len(group):.0f}%",
            share(group, "cut"),
            share(group, "repeated"),
            share(group, "invalid"),
            share(group, "first_expected"),
            share(group, "plain"),
            str(len(group) - len(answered)),
            f"{tokens:.0f}",
        )
    console.print(t)
    out.write_text(json.dumps([asdict(r) for r in rows], indent=2))


def _groups(rows: list[ReplyResult]) -> dict[tuple[str, str], list[ReplyResult]]:
    groups: dict[tuple[str, str], list[ReplyResult]] = {}
    for row in rows:
        groups.setdefault((row.server, row.mode), []).append(row)
    return groups

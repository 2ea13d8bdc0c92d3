"""Long prompt text made in code, the same on every run: numbered operations rules drawn from a seeded
generator until the text reaches a token count. Different seeds give texts that differ from the first rule."""

import random

CONDITIONS = (
    "When p99 latency stays above {x} ms for {y} minutes",
    "Before any deploy after {h}:00 UTC",
    "If the error budget falls below {x} percent",
    "During the weekly failover drill",
    "After a customer reports missing data",
    "Whenever a disk passes {x} percent full",
    "If a certificate expires within {y} days",
    "When the pager fires twice within an hour",
    "Before rotating any shared credential",
    "If replication lag exceeds {y} seconds",
    "When traffic doubles within {y} minutes",
    "During an evacuation of {region}",
)
SUBJECTS = (
    "the on-call engineer",
    "the incident commander",
    "the database team",
    "the release manager",
    "the storage lead",
    "the support liaison",
    "the security officer",
    "whoever holds the pager",
    "the platform team",
    "the shift lead",
)
ACTIONS = (
    "must page the owners of",
    "should notify the customers of",
    "must take a snapshot of",
    "should drain the traffic of",
    "may roll back",
    "must freeze deploys to",
    "should scale out",
    "must open a ticket for",
    "should rotate the keys of",
    "must verify the backups of",
    "should throttle",
    "may fail over",
)
OBJECTS = (
    "the checkout service",
    "the primary Postgres cluster",
    "the billing queue",
    "the search index",
    "the edge cache",
    "the auth gateway",
    "the nightly export job",
    "the object store in {region}",
    "the metrics pipeline",
    "the mobile API",
    "the recommendation model",
    "the payment webhooks",
)
TAILS = (
    "",
    " and record it in the incident log",
    " and post an update every {y} minutes",
    " unless the change was already rolled back",
    " and confirm it with a second engineer",
    ", then wait for the dashboards to settle",
    " and link runbook RB-{code} in the channel",
)
REGIONS = ("eu-west-1", "us-east-2", "ap-south-1", "sa-east-1", "eu-central-1", "us-west-2")


def numbered_rules(seed: int, tokens: int, count) -> str:
    """Numbered one-line rules until they reach `tokens` (count(text) is the model tokenizer's count)."""
    rng = random.Random(seed)
    lines: list[str] = []
    total = 0
    while total < tokens:
        template = f"{rng.choice(CONDITIONS)}, {rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(OBJECTS)}"
        rule = (template + rng.choice(TAILS)).format(
            x=rng.randint(2, 95),
            y=rng.randint(2, 59),
            h=rng.randint(0, 23),
            code=rng.randint(100, 999),
            region=rng.choice(REGIONS),
        )
        line = f"{len(lines) + 1}. {rule}."
        lines.append(line)
        total += count(line + "\n")
    return "\n".join(lines)


def head(tokens: int, count) -> str:
    """The shared text ahead of a short prompt, as an agent's system prompt and tools are: `tokens` of numbered
    rules (seed 0, so a longer head starts with every shorter one) and a blank line; "" for 0."""
    return numbered_rules(seed=0, tokens=tokens, count=count) + "\n\n" if tokens else ""

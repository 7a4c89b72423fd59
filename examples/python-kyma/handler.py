"""A Kyma/Kubeless-style handler: `main(event, context)`, configured through an env var."""

import os


def main(event, context):
    greeting = os.environ.get("GREETING", "Hello")
    name = (event.get("data") or {}).get("name", "world")
    print(f"{context['function-name']}: greeting {name}")
    return {"message": f"{greeting}, {name}!", "event_type": event.get("ce-type") or None}

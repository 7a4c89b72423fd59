"""`init NAME --runtime python3.11|nodejs20 [--style luna|kyma]`: a new function directory,
ready to deploy (like `faas-cli new` and `kn func create`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lambdabus_client.client import ClientSettings
from lambdabus_client.commands.common import UsageError, print_data

RUNTIMES = ("python3.11", "nodejs20")
STYLES = ("luna", "kyma")

_LUNA = '''"""{name}: a LUNA-style lambda. `main` gets the request and returns the answer."""


async def main(request):
    body = request.json or {{}}
    print(f"{name} called with {{body!r}}")
    return {{"message": f"Hello from {name}!", "received": body}}
'''

_KYMA = '''"""{name}: a Kyma-style handler. `main` gets the event and the context."""


def main(event, context):
    data = event.get("data")
    print(f"{{context['function-name']}} called with {{data!r}}")
    return {{"message": "Hello from {name}!", "received": data}}
'''

_NODE = """// {name}: a Node.js 20 handler. `main` gets the event and the context.
exports.main = async function (event, context) {{
  const data = event.data === undefined ? null : event.data;
  console.log(`${{context["function-name"]}} called with ${{JSON.stringify(data)}}`);
  return {{ message: "Hello from {name}!", received: data }};
}};
"""

_REQUIREMENTS = "# One requirement a line (pip format), e.g. humanize==4.12.3\n"


def scaffold(name: str, runtime: str, style: str) -> dict[str, str]:
    """The files of a new function directory, by file name."""
    if runtime == "nodejs20":
        if style != "luna":
            raise UsageError("--style applies to python3.11 only (nodejs20 has one style)")
        package = {"name": name, "version": "1.0.0", "private": True, "dependencies": {}}
        entry, code, deps = "handler.js", _NODE, json.dumps(package, indent=2) + "\n"
        dependency_file = "package.json"
    else:
        entry = "lambda_main.py" if style == "luna" else "handler.py"
        code = _LUNA if style == "luna" else _KYMA
        deps, dependency_file = _REQUIREMENTS, "requirements.txt"
    readme = (
        f"# {name}\n\n"
        f"A {runtime} function ({entry}); add dependencies to {dependency_file}. Deploy it with "
        f"`lambdabus deploy . --name {name}` and call it with `lambdabus invoke {name}`.\n"
    )
    return {entry: code.format(name=name), dependency_file: deps, "README.md": readme}


async def _init(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    target: Path = args.dir if args.dir is not None else Path(args.name)
    files = scaffold(args.name, args.runtime, args.style)
    if target.exists() and any(target.iterdir()):
        raise UsageError(f"{target} exists and is not empty")
    target.mkdir(parents=True, exist_ok=True)
    for file_name, text in files.items():
        (target / file_name).write_text(text, encoding="utf-8")
    if output != "table":
        print_data(output, {"directory": str(target), "files": sorted(files)})
        return 0
    print(f"Created {target}/ ({', '.join(sorted(files))}).")
    print(f"Deploy it: lambdabus deploy {target} --name {args.name}")
    return 0

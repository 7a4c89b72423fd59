"""`completion bash|zsh|fish`: shell completion scripts written from the parser itself, so a new
command or option completes without anyone editing a script."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field

# Options whose next word is their value, not a command.
_VALUE_OPTIONS = ("--url", "-n", "--namespace", "-o", "--output")


@dataclass(frozen=True)
class CommandSpec:
    """A command's help line, its options, and its actions' options (`triggers create`)."""

    help: str
    options: list[str]
    actions: dict[str, list[str]] = field(default_factory=dict)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return {name: (helps.get(name, ""), sub) for name, sub in action.choices.items()}
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(
        {option for action in parser._actions for option in action.option_strings if option}
    )


def command_tree(parser: argparse.ArgumentParser) -> dict[str, CommandSpec]:
    """Every command of `parser` with its options and actions, in the parser's order."""
    tree = {}
    for name, (text, sub) in _subcommands(parser).items():
        actions = {action: _options(leaf) for action, (_, leaf) in _subcommands(sub).items()}
        tree[name] = CommandSpec(text, _options(sub), actions)
    return tree


def completion_script(shell: str, tree: dict[str, CommandSpec]) -> str:
    if shell == "fish":
        return _fish(tree)
    script = _bash(tree)
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def _words(items: list[str]) -> str:
    return shlex.quote(" ".join(items))


def _bash(tree: dict[str, CommandSpec]) -> str:
    cases = []
    for name, spec in tree.items():
        if spec.actions:
            inner = [f"        '') words={_words(list(spec.actions))} ;;"]
            inner += [
                f"        {shlex.quote(action)}) words={_words(options)} ;;"
                for action, options in spec.actions.items()
            ]
            cases.append(
                f'    {shlex.quote(name)})\n      case "$action" in\n'
                + "\n".join(inner)
                + "\n      esac ;;"
            )
        else:
            cases.append(f"    {shlex.quote(name)}) words={_words(spec.options)} ;;")
    value_options = "|".join(_VALUE_OPTIONS)
    return f"""# lambdabus completion for bash: source <(lambdabus completion bash)
_lambdabus() {{
  local cur="${{COMP_WORDS[COMP_CWORD]}}" cmd="" action="" words="" i word skip=0
  for ((i = 1; i < COMP_CWORD; i++)); do
    word="${{COMP_WORDS[i]}}"
    if ((skip)); then skip=0; continue; fi
    case "$word" in
      {value_options}) skip=1; continue ;;
      -*) continue ;;
    esac
    if [[ -z "$cmd" ]]; then cmd="$word"; elif [[ -z "$action" ]]; then action="$word"; fi
  done
  case "$cmd" in
    '') words={_words([*tree, "--help", "--version", "--url", "--namespace", "--output"])} ;;
{chr(10).join(cases)}
  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _lambdabus lambdabus
"""


def _fish(tree: dict[str, CommandSpec]) -> str:
    lines = ["# lambdabus completion for fish: lambdabus completion fish | source"]
    lines.append("complete -c lambdabus -f")
    for name, spec in tree.items():
        lines.append(
            f"complete -c lambdabus -n __fish_use_subcommand -a {shlex.quote(name)}"
            f" -d {shlex.quote(spec.help)}"
        )
        seen = f"__fish_seen_subcommand_from {name}"
        for action, options in spec.actions.items():
            lines.append(f"complete -c lambdabus -n {shlex.quote(seen)} -a {shlex.quote(action)}")
            lines += _fish_options(f"{seen}; and __fish_seen_subcommand_from {action}", options)
        lines += _fish_options(seen, spec.options)
    return "\n".join(lines) + "\n"


def _fish_options(condition: str, options: list[str]) -> list[str]:
    lines = []
    for option in options:
        flag = f"-l {option[2:]}" if option.startswith("--") else f"-s {option[1:]}"
        lines.append(f"complete -c lambdabus -n {shlex.quote(condition)} {flag}")
    return lines

"""``onspec``: serve | generate | chat | bench | rl | simulate-rollout | warmup | export-speculator | info.

Each subcommand lives with the code it drives (``onspec/<room>/commands.py`` exposes ``add_arguments`` and
``run``); this module only assembles the parser and turns bad input into a one-line message with exit
code 2 instead of a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# subcommand -> (module, help)
SUBCOMMANDS = {
    "serve": ("onspec.server.commands", "OpenAI-compatible server with a live dashboard and online drafter learning"),
    "generate": ("onspec.commands", "generate a completion for a prompt"),
    "chat": ("onspec.commands", "interactive chat with the model"),
    "bench": ("onspec.commands", "quick speed check: speculation against plain decoding on a few prompts"),
    "rl": ("onspec.rl.commands", "GRPO on a task with verifiable rewards, rollouts through the engine"),
    "simulate-rollout": ("onspec.rl.simulate.commands",
                         "rollout scheduling at cluster scale: the real scheduler against simulated workers"),
    "warmup": ("onspec.train.commands", "day-1 warm start: train the drafter offline on the model's own answers"),
    "export-speculator": ("onspec.train.commands", "write a drafter version in the EAGLE-3 layout"),
    "info": ("onspec.info", "this machine's CPU flags, threads, and the compute path onspec takes (and why)"),
}


class CLIError(Exception):
    """A user mistake: printed as one line, exit code 2."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help line ends with its default, options without help text included (argparse's
    formatter prints no line for those); an empty, None or False default adds nothing."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and not _empty_default(action.default):
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or _empty_default(action.default) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _empty_default(value) -> bool:
    return value is None or value is False or value == "" or value == [] or value == argparse.SUPPRESS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onspec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"onspec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # a room not built yet, or an optional dependency missing
            p = sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
            p.set_defaults(func=lambda args, e=exc: _unavailable(e))
            continue
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=DefaultsHelpFormatter)
        getattr(mod, "add_arguments")(p, name)
        p.set_defaults(func=getattr(mod, "run"))
    return parser


def _unavailable(exc: Exception) -> int:
    raise CLIError(f"this command is unavailable: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"onspec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

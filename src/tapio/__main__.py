"""``python -m tapio <command>``: one entry point, lazily importing only the command it runs.

The node agent must not pay for (or even import) the controller, the CLI readers or MCP, so
each command's module is imported only when that command is chosen.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python -m tapio [--data-dir DIR] [--color WHEN] <command> [options]

commands:
  agent        run the node agent (eBPF observers -> sinks)
  controller   run the tapio-wire/v1 controller (aiohttp)
  status       per-observer counts over the local occurrence files
  watch        follow new occurrences as they are written
  recent       the most recent occurrences
  health       health summary of the last hour
  mcp          read-only MCP server over stdio
"""

CLI_COMMANDS = frozenset({"status", "watch", "recent", "health", "mcp"})


def _first_command(argv: Sequence[str]) -> str | None:
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--data-dir", "--color", "--colour"):  # options that take a value
            skip = True
            continue
        if arg.startswith("-"):
            continue
        return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = _first_command(args)
    if command is None:
        if any(a in ("-h", "--help") for a in args):
            sys.stdout.write(USAGE)
            return 0
        if any(a in ("-V", "--version") for a in args):
            from tapio import __version__

            sys.stdout.write(f"tapio {__version__}\n")
            return 0
        sys.stderr.write(USAGE)
        return 2
    if command == "agent":
        from tapio.agent.cli import main as agent_main

        args.remove("agent")
        return agent_main(args)
    if command == "controller":
        from tapio.controller.cli import main as controller_main

        args.remove("controller")
        return controller_main(args)
    if command in CLI_COMMANDS:
        from tapio.cli.main import main as cli_main

        return cli_main(args)
    sys.stderr.write(f"tapio: unknown command {command!r}\n\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

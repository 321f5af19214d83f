"""Entry point of the ``isthmus`` CLI.

Commands live in their own modules and are imported only when invoked, so
``isthmus --help`` stays fast and one broken command cannot take down the others.
To add a command: write ``isthmus/cli/<module>.py`` exposing a click command and
register it in ``COMMANDS`` below.
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute"
COMMANDS: dict[str, str] = {
    "controlplane": "isthmus.cli.controlplane:controlplane",
    "analyze": "isthmus.cli.analyze:analyze",
    "apply": "isthmus.cli.apply:apply_cmd",
    "delete": "isthmus.cli.apply:delete_cmd",
    "proxy-status": "isthmus.cli.proxy_status:proxy_status",
    "bootstrap": "isthmus.cli.bootstrap:bootstrap",
    "iptables": "isthmus.cli.iptables:iptables",
    "proxy": "isthmus.cli.proxy:proxy",
    "demo": "isthmus.cli.demo:demo",
    "up": "isthmus.cli.runtime:up",
    "down": "isthmus.cli.runtime:down",
    "status": "isthmus.cli.runtime:status",
    "exec": "isthmus.cli.runtime:exec_cmd",
    "logs": "isthmus.cli.runtime:logs",
    "kube-inject": "isthmus.cli.kube_inject:kube_inject",
    "ca": "isthmus.cli.ca:ca",
    "agent": "isthmus.cli.agent:agent",
    "ztunnel": "isthmus.cli.ztunnel:ztunnel",
    "ztunnel-config": "isthmus.cli.ztunnel_config:ztunnel_config",
    "ztunnel-upgrade": "isthmus.cli.runtime:ztunnel_upgrade",
    "waypoint": "isthmus.cli.waypoint:waypoint",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                return _unavailable(cmd_name, "not implemented yet")
            raise
        return getattr(module, attr)


def _unavailable(name: str, why: str) -> click.Command:
    @click.command(name=name, help=f"({why})", context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def _cmd(args: tuple[str, ...]) -> None:
        raise click.ClickException(f"'isthmus {name}' is {why}")

    return _cmd


@click.group(cls=LazyGroup)
@click.version_option(package_name="isthmus")
def cli() -> None:
    """Isthmus: an Istio-style service mesh in Python."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()

"""``isthmus iptables``: istio-iptables for Isthmus (sidecar traffic capture).

Same flags as istio-iptables (short letters, Istio's long names as aliases, and the same
environment variables), generated from ``isthmus.capture.config.FLAGS``. Builds the
RuleSet, then prints it (``--dry-run``), removes it (``--cleanup``) or applies it
atomically with iptables-restore in the current or given network namespace.

Defaults are a sidecar-injected pod's (``-b '*' -i '*' -d 15090,15021,15020``); pass empty
values (``-b ''``) to turn capture directions off as istio-iptables does without flags.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from isthmus.capture import (
    CaptureApplyError,
    CaptureConfig,
    CaptureConfigError,
    SubprocessExecutor,
    apply_ruleset,
    build_sidecar_rules,
    cleanup_ruleset,
    plan_removals,
    render_plan,
)
from isthmus.capture.config import FLAGS

F = Callable[..., Any]


def _flag_options(func: F) -> F:
    for flag in reversed(FLAGS):
        names = []
        if flag.is_bool:
            names.append(f"--{flag.long}/--no-{flag.long}")
            names.extend(f"--{a}/--no-{a}" for a in flag.aliases)
            option = click.option(*names, flag.field, default=None,
                                  help=f"{flag.help} [env {flag.env}]")
        else:
            if flag.short:
                names.append(f"-{flag.short}")
            names.append(f"--{flag.long}")
            names.extend(f"--{a}" for a in flag.aliases)
            option = click.option(*names, flag.field, default=None, metavar="VALUE",
                                  help=f"{flag.help} [env {flag.env}]")
        func = option(func)
    return func


@click.command(name="iptables", context_settings={"help_option_names": ["-h", "--help"],
                                                   "max_content_width": 100})
@_flag_options
@click.option("-n", "--dry-run", is_flag=True, default=None,
              help="Print the iptables-restore input and ip commands; change nothing "
                   "[env DRY_RUN]")
@click.option("--cleanup", "--clean", "--cleanup-only", "cleanup", is_flag=True, default=False,
              help="Remove our chains, our rules in built-in chains and the TPROXY policy "
                   "route (pass the flags used to apply)")
@click.option("--network-namespace", "netns", default=None, metavar="NAME|PATH",
              help="Apply inside this network namespace (name under /var/run/netns or path)")
def iptables(dry_run: bool | None, cleanup: bool, netns: str | None, **flags: Any) -> None:
    """Set up iptables rules that capture a pod's traffic for its sidecar proxy.

    Outbound TCP goes to --envoy-port (15001), inbound to --inbound-capture-port (15006),
    except traffic of the proxy's own UID/GID, excluded ports, CIDRs and interfaces.
    """
    try:
        config = CaptureConfig.from_strings(flags)
    except CaptureConfigError as exc:
        raise click.UsageError(str(exc)) from None
    ruleset = build_sidecar_rules(config)
    if dry_run is None:
        dry_run = os.environ.get("DRY_RUN", "").lower() in ("1", "true", "yes")

    if dry_run:
        removals = None
        if cleanup:
            removals = {f: plan_removals(ruleset, f) for f in ruleset.families()}
        click.echo(render_plan(ruleset, removals, cleanup=cleanup), nl=False)
        return

    executor = SubprocessExecutor(netns=netns)
    try:
        result = (cleanup_ruleset if cleanup else apply_ruleset)(ruleset, executor)
    except CaptureApplyError as exc:
        raise click.ClickException(str(exc)) from None
    families = ", ".join(f"IPv{int(f)}" for f in ruleset.families())
    where = f" in network namespace {netns}" if netns else ""
    verb = "removed capture rules" if cleanup else "applied capture rules"
    extra = f", {len(result.ip_commands)} ip command(s)" if result.ip_commands else ""
    click.echo(f"isthmus iptables: {verb} ({families}){where}{extra}", err=True)


if __name__ == "__main__":  # pragma: no cover
    iptables(sys.argv[1:])

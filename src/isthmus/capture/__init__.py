"""Traffic capture: CaptureConfig -> RuleSet (data) -> iptables-restore text -> Executor.

- ``config``: ``CaptureConfig``, every istio-iptables flag, validated; ``FLAGS`` table.
- ``rules``: ``RuleSet`` and ``RuleSetBuilder`` (tables, chains, ordered rules, v4/v6),
  plus a parser that replays save/restore text.
- ``sidecar``: ``SidecarCaptureBuilder``, the istio-iptables model (REDIRECT / TPROXY).
  Ambient (ztunnel) capture will be another ``CaptureBuilder`` producing a ``RuleSet``.
- ``render``: ``render_restore`` / ``render_plan`` (``--dry-run`` output).
- ``executor``: ``Executor`` protocol, ``SubprocessExecutor``, ``RecordingExecutor``.
- ``apply``: ``apply_ruleset`` / ``cleanup_ruleset`` (atomic, idempotent, exact).

Used by ``isthmus iptables`` (cli/iptables.py) and, later, the local runtime's pods.
"""

from isthmus.capture.apply import ApplyResult, apply_ruleset, cleanup_ruleset, plan_removals
from isthmus.capture.config import (
    BARE,
    DEFAULT,
    FLAGS,
    CaptureConfig,
    CaptureConfigError,
    InterceptionMode,
)
from isthmus.capture.executor import (
    CaptureApplyError,
    Executor,
    RecordingExecutor,
    SubprocessExecutor,
)
from isthmus.capture.render import Removal, render_plan, render_restore
from isthmus.capture.rules import Family, PolicyRoute, Rule, RuleSet, RuleSetBuilder
from isthmus.capture.sidecar import CaptureBuilder, SidecarCaptureBuilder, build_sidecar_rules

__all__ = [
    "BARE",
    "DEFAULT",
    "FLAGS",
    "ApplyResult",
    "CaptureApplyError",
    "CaptureBuilder",
    "CaptureConfig",
    "CaptureConfigError",
    "Executor",
    "Family",
    "InterceptionMode",
    "PolicyRoute",
    "RecordingExecutor",
    "Removal",
    "Rule",
    "RuleSet",
    "RuleSetBuilder",
    "SidecarCaptureBuilder",
    "SubprocessExecutor",
    "apply_ruleset",
    "build_sidecar_rules",
    "cleanup_ruleset",
    "plan_removals",
    "render_plan",
    "render_restore",
]

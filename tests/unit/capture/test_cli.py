"""``isthmus iptables``: dry-run goldens (ours), flags, env, errors.

Goldens live in tests/golden/iptables/<case>.golden; ``REFRESH_GOLDEN=1`` rewrites them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from isthmus.capture import FLAGS
from isthmus.cli.iptables import iptables

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "iptables"

# The istio-init command line of the seed document (004) for bookinfo's productpage.
SEED_004_ARGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*",
                 "-x", "", "-b", "*", "-d", "15090,15020"]

DRY_RUN_CASES: dict[str, list[str]] = {
    "bookinfo-default": ["--dry-run"],
    "bookinfo-cleanup": ["--dry-run", "--cleanup"],
    "seed-004-istio-init": ["--dry-run", *SEED_004_ARGS],
    "tproxy-dns-ipv6": ["--dry-run", "-m", "TPROXY", "--redirect-dns", "--dns-servers",
                        "10.96.0.10,fd00::a", "--ipv6", "-c", "eth9", "-k", "eth8"],
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for flag in FLAGS:
        if flag.env:
            monkeypatch.delenv(flag.env, raising=False)
    monkeypatch.delenv("DRY_RUN", raising=False)


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(iptables, list(args), env=env)  # click>=8.2: stderr apart
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("case", sorted(DRY_RUN_CASES))
def test_dry_run_golden(case: str) -> None:
    code, out, err = run(*DRY_RUN_CASES[case])
    assert code == 0, err
    path = GOLDEN / f"{case}.golden"
    if os.environ.get("REFRESH_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out)
    assert out == path.read_text()


def test_seed_004_rules_are_the_bookinfo_rules() -> None:
    """The seed's nat rules for productpage, as our REDIRECT mode renders them.

    Differences from the seed (Istio 1.5) are Istio's own later changes, mirrored from the
    golden vectors: the HBONE port 15008 is never captured, the OUTPUT jump is protocol
    independent (no ``-p tcp``), and port 22 is no longer excluded.
    """
    code, out, _ = run(*DRY_RUN_CASES["seed-004-istio-init"])
    assert code == 0
    rules = [line for line in out.splitlines() if line.startswith("-A")]
    assert rules == [
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
        ("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 "
         "-m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"),
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        ("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 "
         "-m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT"),
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    ]


def test_long_names_and_istio_aliases_agree() -> None:
    short = run("-n", "-b", "9080", "-q", "3306", "-o", "6379", "-i", "10.0.0.0/8")[1]
    long = run("--dry-run", "--inbound-ports", "9080", "--outbound-ports", "3306",
               "--local-outbound-ports-exclude", "6379",
               "--outbound-ip-ranges-include", "10.0.0.0/8")[1]
    istio = run("--dry-run", "--istio-inbound-ports", "9080", "--istio-outbound-ports", "3306",
                "--istio-local-outbound-ports-exclude", "6379",
                "--istio-service-cidr", "10.0.0.0/8")[1]
    assert short == long == istio
    assert "-A ISTIO_OUTPUT -p tcp --dport 3306 -j ISTIO_REDIRECT" in short
    assert "-A ISTIO_OUTPUT -p tcp --dport 6379 -j RETURN" in short
    assert "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT" in short


def test_env_defaults_apply() -> None:
    code, out, _ = run("--dry-run", env={"ENVOY_PORT": "16001", "ISTIO_INBOUND_PORTS": "",
                                         "DRY_RUN": "1"})
    assert code == 0
    assert "--to-ports 16001" in out
    assert "PREROUTING" not in out  # inbound capture disabled by the empty env value
    code, out, _ = run(env={"DRY_RUN": "true"})  # DRY_RUN alone: print, apply nothing
    assert code == 0 and "*nat" in out


@pytest.mark.parametrize(("args", "flag"), [
    (["-i", "10.0.0.0/40"], "--outbound-ip-ranges-include (-i)"),
    (["-x", "300.1.1.1"], "--outbound-ip-ranges-exclude (-x)"),
    (["-b", "80,abc"], "--inbound-ports (-b)"),
    (["-d", "99999"], "--local-exclude-ports (-d)"),
    (["-p", "0"], "--envoy-port (-p)"),
    (["-m", "BPF"], "--inbound-interception-mode (-m)"),
    (["--dns-servers", "dns.google"], "--dns-servers"),
])
def test_bad_input_names_the_flag(args: list[str], flag: str) -> None:
    code, out, err = run("--dry-run", *args)
    assert code == 2
    assert out == ""
    assert f"Error: {flag}:" in err

#!/usr/bin/env python3
"""A/B: two checkouts of saslsmtp side by side, the same config and load, rounds interleaved.

A change's cost is a few per cent of a session, less than the drift of a shared machine
over a minute, so the two daemons run at the same time and take turns: in every round
each one gets one ``smtp_auth_load.py`` run (the order alternates), and the report gives
each round's server CPU per session, the medians and the paired differences.  Compare
the two columns with each other, never with another run's figures.

    python3 benchmarks/ab.py /tmp/old                       # /tmp/old against this checkout
    python3 benchmarks/ab.py /tmp/old /tmp/new --rounds 8 -d 4
    python3 benchmarks/ab.py /tmp/old --mode mail           # any run.py load/config option
    python3 benchmarks/ab.py /tmp/old --config-fragment limits.toml

A checkout for the old side: ``git worktree add --detach /tmp/old REV`` (remove it after
with ``git worktree remove /tmp/old``).  Each daemon runs with ``PYTHONPATH`` set to its
checkout, so it imports that checkout's ``saslsmtp``.  Results:
``benchmarks/results/<date>-ab-<label>.md`` (and stdout).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  (benchmarks/run.py)


def commit_of(tree: Path) -> str:
    """The checkout's commit (short), with ``+`` when it has uncommitted changes."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", "-C", str(tree), *argv], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""
    rev = git("rev-parse", "--short", "HEAD") or "?"
    return rev + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")


def daemon(name: str, tree: Path, workdir: Path, args: argparse.Namespace) -> bench.Server:
    """``run.py``'s saslsmtp server with its own folder, importing from ``tree``."""
    folder = workdir / name
    folder.mkdir()
    server = bench.saslsmtp_server(folder, args)
    server.name = name
    assert server.env is not None
    server.env["PYTHONPATH"] = str(tree)
    server.description = f"{tree} ({commit_of(tree)})"
    return server


def add_checkout_arguments(p: argparse.ArgumentParser, label_help: str) -> None:
    """What every A/B takes: the two checkouts, the results file's label, ``--no-save``."""
    p.add_argument("old", type=Path, help="the checkout to compare against")
    p.add_argument("new", type=Path, nargs="?", default=bench.REPO,
                   help="the checkout under test (default: this one)")
    p.add_argument("--label", default="", help=label_help)
    p.add_argument("--no-save", action="store_true", help="print only")


def check_checkouts(p: argparse.ArgumentParser, own: argparse.Namespace) -> None:
    for tree in (own.old, own.new):
        if not (tree / "saslsmtp" / "__init__.py").is_file():
            p.error(f"{tree}: not a saslsmtp checkout")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other options are run.py's load and configuration options (one -c value).")
    add_checkout_arguments(p, "results file label (default: the mode)")
    p.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    own, rest = p.parse_known_args(argv)
    check_checkouts(p, own)
    if own.rounds < 2:
        p.error("--rounds 2 or more please")
    load = bench.parse_args(rest + (["-c", "16"] if not {"-c", "--concurrency"} & set(rest)
                                    else []))
    if len(load.concurrency) != 1 or len(load.mech) != 1:
        p.error("one concurrency and one mechanism per A/B run")
    return own, load


def report(own: argparse.Namespace, load: argparse.Namespace, started: dt.datetime,
           servers: list[bench.Server], cpu: dict[str, list[float]]) -> str:
    old, new = cpu["old"], cpu["new"]
    paired = [100.0 * (n - o) / o for o, n in zip(old, new)]
    m_old, m_new = statistics.median(old), statistics.median(new)
    lines = [
        f"# A/B: {servers[1].description} against {servers[0].description}",
        "",
        f"{started:%Y-%m-%d %H:%M %Z}, `benchmarks/ab.py`: {load.mech[0]}, mode {load.mode}, "
        f"C = {load.concurrency[0]}, {load.generator} generator, {own.rounds} rounds of "
        f"{load.duration:g} s (+{load.warmup:g} s warm-up) per daemon, the two daemons running "
        "side by side and taking turns (order alternating); server CPU (user + system, "
        "/proc/PID/stat) per session, µs. Config fragments: "
        + (", ".join(f"`{f}`" for f in load.config_fragment) or "none") + ".",
        "",
        "| round | old | new | new vs old |",
        "| --- | --- | --- | --- |",
    ]
    for i, (o, n, d) in enumerate(zip(old, new, paired), 1):
        lines.append(f"| {i} | {o:.1f} | {n:.1f} | {d:+.1f}% |")
    lines.append(f"| median | {m_old:.1f} | {m_new:.1f} | {100.0 * (m_new - m_old) / m_old:+.1f}% "
                 f"(paired median {statistics.median(paired):+.1f}%) |")
    lines += ["", f"new lower in {sum(d < 0 for d in paired)} of {len(paired)} rounds.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    own, load = parse_args(argv)
    started = dt.datetime.now().astimezone()
    cpu: dict[str, list[float]] = {"old": [], "new": []}
    try:
        with tempfile.TemporaryDirectory(prefix="saslsmtp-ab-") as tmp:
            servers = [daemon("old", own.old.resolve(), Path(tmp), load),
                       daemon("new", own.new.resolve(), Path(tmp), load)]
            with bench.running(servers):
                for index in range(own.rounds):
                    order = servers if index % 2 == 0 else servers[::-1]
                    for server in order:
                        m = bench.measure(server, load.mech[0], load.concurrency[0], index, load)
                        if not m.ok or m.server_cpu_ms_per_session is None:
                            raise bench.BenchError(f"{server.name}: {m.problem or 'no CPU figure'}")
                        cpu[server.name].append(1000.0 * m.server_cpu_ms_per_session)
                    print(f"round {index + 1}/{own.rounds}: old {cpu['old'][-1]:.1f} µs, "
                          f"new {cpu['new'][-1]:.1f} µs", file=sys.stderr, flush=True)
    except bench.BenchError as e:
        print(f"ab.py: {e}", file=sys.stderr)
        return 1
    publish(report(own, load, started, servers, cpu), None if own.no_save else load.results_dir,
            started, "ab-" + (own.label or load.mode))
    return 0


def publish(text: str, results_dir: str | None, started: dt.datetime, name: str) -> None:
    """Print the report, and keep it as ``<results_dir>/<date>-<name>.md`` (not with
    ``--no-save``: ``results_dir`` ``None``)."""
    print(text)
    if results_dir is not None:
        path = Path(results_dir) / f"{started:%Y%m%d-%H%M%S}-{name}.md"
        path.write_text(text)
        print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

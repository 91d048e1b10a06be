"""``twistd saslsmtp``: the command line.  Everything else is ``saslsmtp.service``."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from saslsmtp.config import ConfigError
from saslsmtp.service import build, check_users_files, load


class Options(usage.Options):
    """``twistd saslsmtp`` options."""

    synopsis = "[--config FILE] [--check]"
    longdesc = ("An SMTP submission server with scriptable SASL authentication. "
                "Configuration: a TOML file (see etc/saslsmtp.toml and the README).")
    optParameters = [
        ["config", "c", "etc/saslsmtp.toml", "The TOML configuration file."],
    ]
    optFlags = [
        ["check", None, "Validate the configuration (and the users file, script and backends "
                        "it names, without contacting servers), print problems, exit 0 or 1."],
    ]

    def postOptions(self) -> None:
        from twisted.internet import reactor
        try:
            config = load(self["config"])
            self["service"] = build(config, reactor)
            if self["check"]:
                check_users_files(config)
        except ConfigError as e:
            print(f"saslsmtp: configuration is not valid:\n{e}", file=sys.stderr)
            raise SystemExit(1)
        if self["check"]:
            print(f"{self['config']}: OK")
            raise SystemExit(0)


def makeService(options: Options) -> IService:
    """The twistd entry point: the service ``Options`` built from the configuration."""
    return options["service"]

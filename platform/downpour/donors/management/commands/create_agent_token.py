"""Issue an agent token for an existing user and print it (it is shown only this once).

    python manage.py create_agent_token --user ops --trusted

The only line on stdout is the token, so a script can capture it. ``--trusted`` marks it
trusted, as staff do in the admin: its agents' pushes set the clipping centre of robust
jobs, which wait for such an agent before they take anyone else (docs/operations.md).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from downpour.accounts.models import User
from downpour.donors.models import AgentToken


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", required=True, help="username of the token's owner")
        parser.add_argument("--name", default="platform agent", help="the token's name")
        parser.add_argument(
            "--trusted", action="store_true", help="vouch for the token's agents (robust jobs)"
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        owner = User.objects.filter(username=opts["user"]).first()
        if owner is None:
            raise CommandError(f"no user {opts['user']!r}; create one first (createsuperuser)")
        token, plain = AgentToken.issue(owner, opts["name"][:100])
        if opts["trusted"]:
            token.is_trusted = True
            token.save(update_fields=["is_trusted"])
        self.stderr.write(
            f"token {token.prefix}… for {owner.username}"
            f"{' (trusted)' if token.is_trusted else ''}; only its SHA-256 is stored"
        )
        self.stdout.write(plain)

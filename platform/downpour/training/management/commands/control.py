"""Operators' job control and authority from the shell (the console and admin do the same).

manage.py control pause|resume|cancel|delete JOB_ID
manage.py control revoke TOKEN_ID_OR_PREFIX
manage.py control ban|unban AGENT_ID_OR_NAME [--reason TEXT]
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q

from downpour.donors.models import Agent, AgentToken
from downpour.training.actions import control
from downpour.training.actions.bans import OPERATOR_BAN_REASON, lift_ban
from downpour.training.models import Job

JOB_ACTIONS = {
    "pause": control.pause_job,
    "resume": control.resume_job,
    "cancel": control.cancel_job,
}


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=[*JOB_ACTIONS, "delete", "revoke", "ban", "unban"])
        parser.add_argument("target", help="a job id, a token id or prefix, an agent id or name")
        parser.add_argument("--reason", default=OPERATOR_BAN_REASON)

    def handle(self, *args: Any, **opts: Any) -> None:
        action, target = opts["action"], opts["target"]
        if action in JOB_ACTIONS or action == "delete":
            job = Job.objects.filter(id=target).first()
            if job is None:
                raise CommandError(f"no job {target}")
            if action == "delete":
                control.delete_job(job)
                self.stdout.write(f"job {target} deleted")
                return
            if not JOB_ACTIONS[action](job):
                raise CommandError(f"job {target} is {job.status}; cannot {action} it")
            self.stdout.write(f"job {target}: {action} done")
        elif action == "revoke":
            token = _one(AgentToken.objects.filter(_id_or(target, "prefix")), "token", target)
            control.revoke_token(token)
            self.stdout.write(f"token {token.prefix}… revoked")
        else:
            agent = _one(Agent.objects.filter(_id_or(target, "name")), "agent", target)
            if action == "ban":
                control.ban_agent(agent, opts["reason"])
            else:
                lift_ban(agent)
            self.stdout.write(f"agent {agent.name}: {action} done")


def _id_or(target: str, field: str) -> Q:
    import uuid

    try:
        return Q(id=uuid.UUID(target))
    except ValueError:
        return Q(**{field: target})


def _one(queryset: Any, what: str, target: str) -> Any:
    found = list(queryset[:2])
    if len(found) != 1:
        raise CommandError(f"{len(found) or 'no'} {what}s match {target!r}")
    return found[0]

"""Assemble the desktop pieces for a running agent: the governor over this machine's
idle, load and battery, and the status page beside it."""

from __future__ import annotations

from downpour_agent.desktop import idle, resources
from downpour_agent.desktop import settings as cfg
from downpour_agent.desktop.governor import DutyCycle, Governor, Policy
from downpour_agent.desktop.status import AgentStatus
from downpour_agent.desktop.statuspage import StatusPage, load_or_create_secret


def build_governor(settings: cfg.Settings, threads: int) -> Governor:
    """A governor reading this machine's input idle time (or other load) and battery."""
    policy = Policy(
        settings,
        input_idle=idle.input_idle_source(),
        other_load=idle.OtherLoad(),
        on_battery=resources.on_battery,
    )
    status = AgentStatus(server_url=settings.server_url, settings=settings.to_dict())
    return Governor(policy, DutyCycle(settings.cpu_share, threads), status)


def start_status_page(governor: Governor, port: int | None = None) -> StatusPage:
    """Serve the status page on 127.0.0.1 (``port`` defaults to the settings')."""

    def save(new: cfg.Settings) -> None:
        # Keep what only the file holds (server, token) and write the page's changes.
        cfg.save(cfg.load().replace(**{k: getattr(new, k) for k in cfg.EDITABLE}))

    return StatusPage(
        governor,
        load_or_create_secret(),
        governor.settings.status_port if port is None else port,
        save,
    ).start()

"""Every orchestration and activity, put on a worker in one call: the one door from ``durable`` into here."""

from __future__ import annotations

from typing import Any

from sitebackup.workflows.activity import ActivityDeps, unless_halted
from sitebackup.workflows.backup import backup_site_content
from sitebackup.workflows.copy import build_activities
from sitebackup.workflows.fetch import build_restore_activities
from sitebackup.workflows.restore import restore_site_content
from sitebackup.workflows.seal import build_seal_activities
from sitebackup.workflows.tree import build_tree_activities

__all__ = ["ActivityDeps", "register"]

ORCHESTRATIONS = (backup_site_content, restore_site_content)


def register(worker: Any, deps: ActivityDeps) -> None:
    """Add every orchestration and every activity (bound to *deps*) to a durabletask worker."""
    for orchestration in ORCHESTRATIONS:
        worker.add_orchestrator(orchestration)
    for activity in [*build_activities(deps), *build_restore_activities(deps), *build_seal_activities(deps),
                     *build_tree_activities(deps)]:
        worker.add_activity(unless_halted(activity, deps))

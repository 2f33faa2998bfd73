"""Durable names and limits: what is stored in histories and shared by every worker, in one leaf module.

Renaming an orchestration or activity here breaks runs recorded under the old name: these strings
are part of the state format.
"""

from __future__ import annotations

import os
from datetime import timedelta

from durabletask import task

from sitebackup.errors import InputError

BACKUP_ORCHESTRATION = "BackupSiteContent"
RESTORE_ORCHESTRATION = "RestoreSiteContent"
SCAN_TREE = "ScanSourceTree"
COPY_BATCH = "CopyFileBatch"
PLAN_RESTORE = "PlanRestore"
RESTORE_BATCH = "RestoreFileBatch"
SEAL_RECORD = "SealRunRecord"
RESTORE_TREE = "RestoreTree"

# a run parked until `sitebackup resume` raises RESUME_EVENT (see window.run_page_window)
WAITING_PHASE = "waiting-destination"
RESUME_EVENT = "resume"

PAGES_PER_GENERATION = 100  # then continue-as-new: one instance's history stays bounded
# outputs stay small whatever the tree: lists of failures are capped, with counts of the rest
MAX_LISTED = 20
BATCH_FILES = 256
BATCH_BYTES = 16 * 1024 * 1024
# unchanged files cost no I/O in the copy activity, so their pages are much larger
UNCHANGED_PAGE = 4096
# a backup's page, once it holds this many entries, ends after an entry whose path's hash says so (one path in
# PAGE_CUT_ODDS): the pages of the record a run seals then end at the same paths from run to run, and a file added
# or removed changes the record page it falls in, where pages cut by count would all shift and all be sent again
PAGE_CUT_MIN = 2048
PAGE_CUT_ODDS = 1024
# a scan records a page of unchanged files itself, sparing it an activity, while its list of such pages
# (ranges of page numbers, in the scan's result and the orchestration's state) stays this short
MAX_DONE_RANGES = 64
# a chunk of a run's page index lists this many pages' SHA-256 (workflows.pages): the orchestration carries a hash
# per chunk, and a process reads a chunk once for all its pages
PAGES_PER_INDEX = 1024
# a scan holds back this many files to cut its first pages smaller, so a small tree still fills the window
SCAN_HEAD = 4096

# a request to the blob service is retried for about a minute (blob.clients.make_service_client);
# a batch is then attempted three times in all, 5 s and 10 s apart, before the run waits
BATCH_FIRST_RETRY_SECONDS = 5
# for tests only: a shorter first interval, so that tests of batches that keep failing wait less; it can only
# shorten the waits, never take an attempt away
ENV_BATCH_RETRY_SECONDS = "SITEBACKUP_BATCH_RETRY_SECONDS"


def batch_retry() -> task.RetryPolicy:
    """The retry policy of every batch: BATCH_FIRST_RETRY_SECONDS first, or the shorter test value."""
    value = os.environ.get(ENV_BATCH_RETRY_SECONDS, "").strip()
    if value and not (value.isdigit() and 1 <= int(value) <= BATCH_FIRST_RETRY_SECONDS):
        raise InputError(f"{ENV_BATCH_RETRY_SECONDS} must be a whole number of seconds from 1 to "
                         f"{BATCH_FIRST_RETRY_SECONDS}, not {value!r}")
    return task.RetryPolicy(
        first_retry_interval=timedelta(seconds=int(value or BATCH_FIRST_RETRY_SECONDS)),
        max_number_of_attempts=3,
        backoff_coefficient=2.0,
        max_retry_interval=timedelta(seconds=60),
    )

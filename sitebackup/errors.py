"""The exception hierarchy every layer raises and the exit codes the CLI turns them into.

One place owns the mapping so ``--help``, README and behaviour cannot drift apart.
"""

EXIT_OK = 0
EXIT_FILES_FAILED = 1
EXIT_USAGE = 2
EXIT_DESTINATION = 3
EXIT_ALREADY_RUNNING = 4
EXIT_STATE_FULL = 5
EXIT_STALLED = 6
EXIT_CANCELLED = 7
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 every file backed up or unchanged; 1 the run finished but some files failed; "
    "2 usage or input error; 3 destination unreachable or access denied; "
    "4 the same backup is already running elsewhere (with --no-wait); 5 the state directory filled up (or "
    "stopped taking writes) during the run, which is saved; 6 the same backup is running but has made no "
    "progress for --stall-after (with --no-wait); 7 the run was cancelled; 70 internal error; 130 interrupted."
)


class SiteBackupError(Exception):
    """An expected failure with a one-line message for the user."""

    exit_code = EXIT_USAGE


class InputError(SiteBackupError):
    """Bad arguments or input: missing source, invalid container name, no storage configured."""

    exit_code = EXIT_USAGE


class DestinationError(SiteBackupError):
    """The blob service cannot be reached, or refuses our credentials."""

    exit_code = EXIT_DESTINATION


class AlreadyRunningError(SiteBackupError):
    """A live process is already running the same backup."""

    exit_code = EXIT_ALREADY_RUNNING

    def __init__(self, message: str, instance_id: str):
        super().__init__(message)
        self.instance_id = instance_id


class StateFullError(SiteBackupError):
    """The state directory filled up (or stopped taking writes) during a run; the run is saved (*kept* says
    what a command that is not a run kept)."""

    exit_code = EXIT_STATE_FULL

    def __init__(self, state_dir: object, cause: str, instance_id: str | None = None, kept: str = "the run is saved"):
        again = f"run the same command again, or: sitebackup resume {instance_id}" if instance_id \
            else "run the same command again"
        super().__init__(f"state directory {state_dir} cannot be written ({cause}); {kept}: "
                         f"free space there, then {again}")


class StalledError(AlreadyRunningError):
    """A live process holds the same backup, but the run has made no progress for too long."""

    exit_code = EXIT_STALLED

"""The exception hierarchy every layer raises and the exit codes the CLI turns them into.

One place owns the mapping so ``--help``, README and behaviour cannot drift apart.
"""

EXIT_OK = 0
EXIT_FILES_FAILED = 1
EXIT_USAGE = 2
EXIT_DESTINATION = 3
EXIT_ALREADY_RUNNING = 4
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 every file backed up or unchanged; 1 the run finished but some files failed; "
    "2 usage or input error; 3 destination unreachable or access denied; "
    "4 the same backup is already running elsewhere (with --no-wait); 70 internal error; 130 interrupted."
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

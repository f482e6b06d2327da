"""User-facing errors: the CLI prints these as a message (file and fix), never as a traceback."""


class SegforgeError(Exception):
    """A problem the user can fix: bad input, a missing artifact, a wrong option."""

    exit_code = 2


class ArtifactError(SegforgeError):
    """An artifact on disk is missing, of another schema version, or unreadable; names the command to re-run."""

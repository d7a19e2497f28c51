"""The one exception type that the CLI turns into a short message instead of a traceback."""


class UserError(Exception):
    """A problem with the user's config, files or data, with a message that says the fix."""

"""Errors that bad input causes, as opposed to bugs.

Their message says what is wrong and how to fix it, so the command line prints it alone, without
a traceback (HYDRA_FULL_ERROR=1 adds it). Each also derives from the built-in type that fits, so
that callers may catch ValueError, FileNotFoundError, ... as usual.
"""


class UserError(Exception):
    """Bad input that the user can fix."""


class BadValue(UserError, ValueError):
    """A config value, argument or file content that cannot be used."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder that the command needs and did not find."""


class MissingPackage(UserError, ModuleNotFoundError):
    """An optional package that the chosen config needs (logger=mlflow, logger=wandb)."""


class Unwritable(UserError, OSError):
    """A folder the command must write to and cannot."""


class Diverged(UserError, FloatingPointError):
    """Training met a non-finite value and stopped before the weights changed."""


def user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err` (Hydra's instantiate wraps what a constructor raises), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None

"""Errors that smartscope reports to users as one clear line."""

from __future__ import annotations


class SmartscopeError(Exception):
    """Base class for problems caused by user input (config, experiment, model).

    The CLI prints these as a single ``error: ...`` line and exits with code 2.
    """


class ConfigError(SmartscopeError):
    """A Micro-Manager hardware configuration is missing or cannot be loaded."""


class ExperimentError(SmartscopeError):
    """An experiment file is missing, is not valid YAML or has impossible values."""


class OutputError(SmartscopeError):
    """A run directory that cannot be written: a file, no permission, a full disk."""


class RegistryError(SmartscopeError):
    """A segmenter or policy name is not known."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none).

    Micro-Manager errors carry multi-line traces; users get one line. A first
    line that only announces a list ("Error(s) in loading state_dict for
    X:") gets the list's first line after it.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]

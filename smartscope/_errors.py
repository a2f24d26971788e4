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
    """The first line of an exception's message (its repr if it has none).

    Micro-Manager errors carry multi-line traces; users get one line.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)

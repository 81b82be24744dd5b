"""
commands.py -- what every command shares: its flags, their defaults in its --help, one line per error.

Every command (train.py, sample.py, tools/, experiments/, perf/) has the same main:

    def main(argv=None):
        args = parser().parse_args(argv)       # a flag of the wrong type: argparse's usage and one line
        with one_line_errors(PROG):            # anything else a user can cause: one line, exit status 1
            check_args(args)                   # every flag, before anything is read or written
            run(args)

train.py's flags are the fields of its configuration dataclass (parse_config), with defaults that
may depend on other flags (recipes: `--model tiny` and `--task instructions` set their own).

This file imports only the standard library.
"""

import argparse
import dataclasses
import os
import sys
from contextlib import contextmanager


class DefaultsHelp(argparse.HelpFormatter):
    """A flag's help ends with its default, unless there is none to tell (None, "", a switch's
    False, --help's) or the help tells it itself ("(default: the preset's)")."""

    def _get_help_string(self, action):
        told = action.default in (None, "", argparse.SUPPRESS) or action.default is False or "(default" in action.help
        return action.help if told else f"{action.help} (default: %(default)s)"


@contextmanager
def one_line_errors(prog, interrupted=None):
    """Around a command's checks and its run: the errors a user can cause -- a bad flag or file,
    bad data, a full disk (ValueError, OSError), a non-finite loss (FloatingPointError) -- end the
    command with one line, `PROG: error: ...`, and exit status 1; Ctrl-C with `PROG: interrupted`,
    and what interrupted() says to do next. SELM_DEBUG=1 shows the whole traceback instead."""
    try:
        yield
    except (ValueError, OSError, FloatingPointError) as e:  # DataError, JudgeError and WriteError included
        if os.environ.get("SELM_DEBUG"):
            raise
        sys.exit(f"{prog}: error: {e}")
    except KeyboardInterrupt:
        if os.environ.get("SELM_DEBUG"):
            raise
        sys.exit(f"{prog}: interrupted" + (f"; {interrupted()}" if interrupted else ""))


def parse_config(cls, argv=None, description=None, recipes=(), prog=None):
    """An instance of the dataclass `cls` from the command line: one flag per field (--snake-case),
    its help the field's metadata["help"] and its default; booleans are switches.

    recipes: ((name, value), {field: default}) rows. When field `name` has `value` (given or by
    default), the row's defaults replace the dataclass's, for the flags not given; a later row
    wins over an earlier one. --help shows each default with the rows that change it."""
    ap = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        changed = "".join(f"; --{k.replace('_', '-')} {v}: {row[f.name]}" for (k, v), row in recipes if f.name in row)
        if f.default is None or f.default == "" or f.default is False:  # none to tell, or the help tells it
            help = f.metadata["help"] + (f" ({changed[2:]})" if changed else "")
        else:
            help = f"{f.metadata['help']} (default: {f.default}{changed})"
        if f.type is bool:
            ap.add_argument(flag, action="store_true", help=help)
        else:
            ap.add_argument(flag, type=f.type, help=help)
    given = vars(ap.parse_args(argv))
    return cls(**{**defaults_for(cls, recipes, given), **given})


def defaults_for(cls, recipes, values):
    """The defaults of the dataclass `cls` for a configuration with these values (the flags given):
    the fields' own, with the rows of `recipes` whose field has its value."""
    out = {f.name: f.default for f in dataclasses.fields(cls)}
    for (name, value), row in recipes:
        if values.get(name, out[name]) == value:
            out.update(row)
    return out

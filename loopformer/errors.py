"""User-facing errors: each carries one line that names the field and the fix.

The CLI catches `LoopformerError`, prints `error: <message>` and exits with status 2, so a user
never sees a stack trace from deep inside JAX for a mistake they made.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections.abc import Sequence

LONG = 500  # a value longer than this in a message was pasted whole (a path is rarely longer): cut to SHOWN characters
SHOWN = 80
_LIST = re.compile(rf"\[[^\[\]\n]{{{LONG - 1},}}\]|\{{[^{{}}\n]{{{LONG - 1},}}\}}")  # a list or mapping, flat
_WORD = re.compile(rf"\S{{{LONG + 1},}}")  # a run without spaces: a string, a path, a name
_TAIL = re.compile(r"(['\"]?)([;,.:)\]}]*)$")


def not_utf8(text: str) -> str | None:
    """The first byte of ``text`` that is not UTF-8, as ``\\xff`` (Python keeps such a byte of a command line or a file
    name as a lone surrogate, which the checkpoint library and tensorboard cannot encode), or None for UTF-8 text."""
    bad = next((c for c in text if "\udc80" <= c <= "\udcff"), None)
    return None if bad is None else f"\\x{ord(bad) - 0xDC00:02x}"


def foreign_digit(text: str) -> str | None:
    """The phrase for the first digit of ``text`` that is not ASCII (``'٣' is a digit of another script (U+0663); ...``), or
    None: Python's int() and float() read ``٣`` or ``３`` as 3, where a flag's number is meant to be written in 0-9
    (#27 pass 40's leftover: `--loops X=٣` ran 3 loops)."""
    bad = next((c for c in text if c.isdigit() and not "0" <= c <= "9"), None)
    if bad is None:
        return None
    return f"'{bad}' is a digit of another script (U+{ord(bad):04X}); write ASCII digits 0-9"


def invisible(args: Sequence[str], message: str = "") -> str:
    """`` (... holds U+200B (ZERO WIDTH SPACE), a character that does not show; retype it without it)`` for the first
    of ``args`` holding a format character (Unicode Cf: zero-width spaces and joiners, a byte-order mark, a soft
    hyphen, direction marks), else "": appended to a command's error line, since the line quotes the argument as if
    it were what the user typed and can name nothing wrong in what they see (`--loops X=2` with U+200B after it was
    "'2' is not a loop count"; #27 pass 41's leftover). Only on an error: a prompt may hold a joiner on purpose.
    "" too where ``message``, the line it would end, names the character already."""
    for arg in args:
        odd = hidden_char(str(arg))
        if odd is not None and f"U+{ord(odd):04X}" not in message:
            return f" ('{escaped(arg)}' {holds(odd)}, a character that does not show; retype it without it)"
    return ""


def hidden_char(text: str) -> str | None:
    """The first format character of ``text`` (Unicode Cf: it does not show), or None."""
    return next((c for c in text if unicodedata.category(c) == "Cf"), None)


def escaped(text: object) -> str:
    """``text`` in ASCII, every other character escaped (``qs\\u200b``): what does not show is shown."""
    return printable(text).encode("ascii", "backslashreplace").decode("ascii")


def holds(char: str) -> str:
    """``holds U+200B (ZERO WIDTH SPACE)``."""
    return f"holds U+{ord(char):04X} ({unicodedata.name(char, 'a format character')})"


def lookalike(value: str, names: Sequence[str]) -> str:
    """`` ('а' is U+0430 (CYRILLIC SMALL LETTER A), which is not ASCII; retype the name)`` for the first character of
    ``value`` that is not ASCII where every one of ``names`` (the choices) is ASCII, else "": appended to a "not one
    of" line, which quoted a look-alike (`inputs: [chаnge]` with a Cyrillic а, or a zero-width space pasted inside a
    quoted value) as the very name it listed as a choice (#27 pass 42)."""
    if not all(str(n).isascii() for n in names):
        return ""
    odd = next((c for c in str(value) if not c.isascii()), None)
    if odd is None:
        return ""
    name = unicodedata.name(odd, "a character without a name")
    return f" ('{odd}' is U+{ord(odd):04X} ({name}), which is not ASCII; retype the name)"


def unplain_digits(text: str) -> str | None:
    """`foreign_digit`'s phrase, or for a number written with ``_`` between its digits (``1_0``) that it must be
    written without (Python's int() and float() read ``1_0`` as 10: `--examples 1_0` scored 10 examples, `fixed(1_0)`
    ran 10 loops; #27 pass 41's leftover), or None."""
    grouped = re.search(r"[0-9][0-9.]*(?:_[0-9][0-9.]*)+", text)
    if grouped is not None:
        return f"'{grouped.group(0)}' is written with '_'; write the number's digits alone (e.g. 10, not 1_0)"
    return foreign_digit(text)


BYTES = "loopformer.bytes"  # a codec error handler: ``printable``'s escapes for a stream (`cli._escape_unencodable`)


def _bytes_escape(error: UnicodeError) -> tuple[str, int]:
    """Each byte that is not UTF-8 (a lone surrogate) as ``\\xff``, as `printable` writes it; any other character the
    stream cannot encode as ``backslashreplace`` writes it."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start:error.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else c.encode("ascii", "backslashreplace")
                   .decode("ascii") for c in text), error.end


codecs.register_error(BYTES, _bytes_escape)


# hyphens, en and em dashes, minus, and the full-width and small hyphen-minus of a CJK input method (`－－loops` was
# read as a second value of the flag before it, #27 pass 41): a flag pasted from a page
DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\uff0d\ufe63"


def plain_flag(flag: str) -> str:
    """``flag`` as a flag is typed: ``—loops``, ``-loops`` and ``--Loops`` as ``--loops``, ``–c`` as ``-c``."""
    name = flag.lstrip("-" + DASHES)
    return flag if not name else "-" + name if len(name) == 1 else "--" + name.lower()


def printable(text: object) -> str:
    """``text`` (or a path) with each byte that is not UTF-8 written as ``\\xff`` (`not_utf8`): a line naming it can
    be printed (the lone surrogate Python keeps cannot be encoded)."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unescape_repr(message: str) -> str:
    """``message`` with ``repr``'s escape of a byte that is not UTF-8 (``\\udcff``: the lone surrogate Python keeps for
    it) written ``\\xff``, as `printable` writes it where a line quotes it bare (argparse's "invalid choice: '\\udcff'";
    #27 passes 35 and 36)."""
    # only an escape repr wrote: after an even run of backslashes (the user's own text `\udcff` is `\\udcff` in a
    # repr, and was turned into `\\xff`, which they never typed; #27 pass 37)
    return re.sub(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])", r"\1\\x\2", message)


def shorten(message: str) -> str:
    """``message`` with each list or mapping, and each word, of more than `LONG` characters cut to its first `SHOWN`,
    ``…`` and its length: an override whose 3,000-character value was refused quoted it whole, one line of 3,000
    characters (#27 pass 24's leftover). Closing quotes, brackets and punctuation stay; values, paths and names of
    usual lengths are untouched."""

    def cut_list(match: re.Match[str]) -> str:
        span = match.group(0)
        return f"{span[:SHOWN]}…{span[-1]} ({len(span):,} characters)"

    def cut_word(match: re.Match[str]) -> str:
        word = match.group(0)
        tail = _TAIL.search(word)
        quote, punct = (tail.group(1), tail.group(2)) if tail else ("", "")
        return f"{word[:SHOWN]}…{quote} ({len(word) - len(punct):,} characters){punct}"

    return _WORD.sub(cut_word, _LIST.sub(cut_list, message))


class LoopformerError(Exception):
    """Base class for errors caused by user input (configs, files, flags). Its message is `shorten`ed: every
    message, in the CLI's one line and to a library caller, shows a long value by its start and length."""

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str):
            args = (shorten(args[0]), *args[1:])
        super().__init__(*args)


class ConfigError(LoopformerError):
    """A config key, value, type or shape is invalid."""


class DataError(LoopformerError):
    """A data source or task setting is invalid."""


class CheckpointError(LoopformerError):
    """A checkpoint is missing, corrupt, or belongs to a different model."""


class PlanError(LoopformerError):
    """A loop count, gate or circuit name given to run a model does not fit it."""


class AnalysisError(LoopformerError):
    """A flag of an analysis command does not fit the run (no such run, unknown split, impossible request)."""


class DecodingError(PlanError):
    """Cached decoding cannot run this model or plan exactly (recomputing the whole prefix can)."""


class OutputError(LoopformerError):
    """Standard output could not be written (a full disk behind `> file`, /dev/full): not the run's files."""

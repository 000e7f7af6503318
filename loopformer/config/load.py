"""Building a `Config`: defaults <- YAML file <- ``a.b.c=value`` overrides, then validation; and the
difference between two configs, part by part (what a resume may change).

Every mistake a user can make in a config (unknown key, wrong type, impossible shape) raises one
`ConfigError` whose message names the dotted field and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loopformer.config.schema import ARCHITECTURE, BEHAVIOUR, CIRCUIT_PARTS, SCHEDULE, Config, ModelConfig
from loopformer.errors import DASHES, ConfigError, not_utf8, plain_flag, printable, unplain_digits
from loopformer.runs.layout import not_a_file

TASK = "task"  # the data a run learns: a resume must keep it, like the architecture
SETTING = "setting"  # everything else (training, evaluation, data order): may change on resume


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _got(value: Any) -> str:
    """``value`` as an error shows it; text holding a tab says so: YAML does not read a tab as a space, so a value
    like '\\t5' or '{a:\\t[1, 2]}' was kept as text and refused without saying why."""
    tab = isinstance(value, str) and "\t" in value
    return f"{value!r}" + (" (it holds a tab, which YAML does not read as a space: write spaces)" if tab else "")


def _plain_number(value: _Spelled, path: str) -> int | float:
    """The number a `_Spelled` value reads as, or ConfigError for the YAML 1.1 forms whose number is not the one
    written (#27 pass 42: `train.steps=1_0` trained 10 steps where `fixed(1_0)` was refused, `010` read as octal 8,
    `1:20` as base 60, 80); hexadecimal (`0x10`), a sign, trailing zeros and `.inf` read as written."""
    text = str(value)
    if "_" in text:
        raise ConfigError(f"{path}: {unplain_digits(text) or repr(text) + ' is written with _'}")
    if ":" in text:
        raise ConfigError(f"{path}: '{text}' reads in YAML as a base-60 number ({value.number}); write the number "
                          f"itself")
    if re.fullmatch(r"[-+]?0[0-7]+", text):
        raise ConfigError(f"{path}: '{text}' starts with 0, which YAML reads as an octal number ({value.number}); "
                          f"write it without the leading 0")
    return value.number


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check/convert one YAML value against a type annotation."""
    origin = typing.get_origin(tp)
    if isinstance(value, _Spelled) and origin not in (typing.Union, types.UnionType):  # each form of a union decides
        return str(value) if tp is str else _convert(_plain_number(value, path), tp, path)  # the text, else the number
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                              f"got {_got(value)}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]  # the first form's ("expected a list, got 'X'"), not the null's
    if tp is type(None):  # the null of an optional field (it took any value: route: X was kept as the string 'X')
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {_got(value)}")
        return None
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_got(value)}")
        return [_convert(v, item, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_got(value)}")
        odd = next((k for k in value if k is None or isinstance(k, bool)), 0)
        if odd != 0:  # YAML reads an unquoted null, ~ or true as a value: it became the name "None" or "True"
            word = "null" if odd is None else str(odd).lower()
            raise ConfigError(f"{path}: the key {word} is a YAML value, not a name; quote it ('{word}': ...) or use "
                              f"another word")
        return {str(k): _convert(v, item, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return _numbers(value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        odd = unplain_digits(value)  # float() reads "1e-0_3" and "٣e-3" as numbers (#27 pass 42)
        if odd:
            raise ConfigError(f"{path}: {odd}")
        try:  # YAML 1.1 reads "3e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if tp is str and (value is None or isinstance(value, bool)):  # `run.name=yes` was "expected str, got True"
        word = next((w for w in ("null", "true", "false") if str(value).lower() in (w, "none")), str(value))
        raise ConfigError(f"{path}: expected text, got {word}, which YAML reads as a value (from null, ~, true, yes, "
                          f"on, false, no, off); quote it to use it as text, e.g. {path}='\"{word}\"'")
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_got(value)}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{path}': {hint}valid keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


class Refused(yaml.YAMLError):
    """YAML that reads, and that a config refuses (the message says why): a key given twice, aliases past any config."""


class DuplicateKey(Refused):
    """A mapping names one key twice (YAML lets the last value win with no word)."""


class YAMLSize(Refused):
    """A document whose aliases expand past any config (a YAML "billion laughs"), or hold themselves."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (`DuplicateKey`), naming the key and both lines:
    a config's, and a run's own config.yaml edited by hand (where the last value won with no word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        merges = 0
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys are the defaults the others override
                merges += 1
                line = key_node.start_mark.line + 1
                if merges > 1:  # both were merged, the last one's keys winning, with no word (#27 pass 41)
                    raise DuplicateKey(f"the merge key '<<' is given twice in one mapping (line {line}); merge "
                                       f"several mappings with one key, <<: [*a, *b]")
                self._merged_once(value_node, line)
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool):  # a list or mapping key is refused below (unhashable)
                if key in seen:
                    raise DuplicateKey(f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one")
                seen[key] = line
        return super().construct_mapping(node, deep)


    def _merged_once(self, value_node: yaml.Node, line: int) -> None:
        """DuplicateKey for a key that two of the mappings a ``<<: [*a, *b]`` merges both give: YAML says the
        earlier wins, and PyYAML let the later one win, with no word (#27 pass 41)."""
        if not isinstance(value_node, yaml.SequenceNode):
            return
        where: dict[Any, int] = {}
        for sub in value_node.value:
            if not isinstance(sub, yaml.MappingNode):
                continue  # PyYAML names it ("expected a mapping for merging")
            for key_node, _ in sub.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = key_node.value
                if key in where:
                    raise DuplicateKey(f"key '{key}' is given by two of the mappings merged at line {line} (lines "
                                       f"{where[key]} and {key_node.start_mark.line + 1}), and YAML readers differ "
                                       f"on which wins; keep it in one")
                where[key] = key_node.start_mark.line + 1


class _StrictLoader(UniqueKeyLoader):
    """`UniqueKeyLoader` that keeps the text of a number YAML reads in another form (`_Spelled`)."""


class _Spelled(str):
    """A YAML number written in a form that ``str`` does not give back (``010`` is 8, ``12:30:00`` 45000, ``0x1F``,
    ``1_000``, ``.inf``), or a date (``2024-01-01``): its text, read as text by a string field (run.name=010 named the
    run 8), and the value YAML reads."""

    number: int | float


def _number(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    read = (yaml.SafeLoader.construct_yaml_int if node.tag.endswith(":int") else
            yaml.SafeLoader.construct_yaml_timestamp if node.tag.endswith(":timestamp") else
            yaml.SafeLoader.construct_yaml_float)
    value = read(loader, node)
    if node.value == str(value) and not node.tag.endswith(":timestamp"):
        return value
    spelled = _Spelled(node.value)
    spelled.number = value
    return spelled


def _numbers(value: Any, path: str) -> Any:
    """``value`` (at ``path``) with every `_Spelled` number the number it reads as (a free-form mapping keeps YAML's
    reading), or ConfigError for one `_plain_number` refuses."""
    if isinstance(value, _Spelled):
        return _plain_number(value, path)
    if isinstance(value, dict):
        return {_numbers(k, path): _numbers(v, f"{path}.{k}") for k, v in value.items()}
    return [_numbers(v, f"{path}.{i}") for i, v in enumerate(value)] if isinstance(value, list) else value


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _number)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _number)
# a date or time (run.name=2024-01-01) was refused as "expected str, got datetime.date(2024, 1, 1)" (#27 pass 41)
_StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", _number)


MAX_YAML_VALUES = 100_000  # a config holds hundreds; aliases (*a) can repeat a node far past any real one


class YAMLDepth(Refused):
    """A document nested past Python's recursion limit (``[[[[...``): PyYAML composes nodes recursively."""

    def __init__(self) -> None:
        super().__init__("its lists or mappings are nested inside each other too deeply to read (a config nests a "
                         "few levels); write it flat")


def _yaml(text: str) -> Any:
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded(node, {}, set())
        return loader.construct_document(node)
    except RecursionError:  # a config file or an override of 5,000 '[' was a RecursionError traceback (#27 pass 24)
        raise YAMLDepth() from None
    finally:
        loader.dispose()


def _expanded(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values ``node`` holds once its aliases are copied out (as the config's checks and merges do); a
    YAMLSize past MAX_YAML_VALUES or for a node that holds itself: nine aliases of nine
    aliases of ... under data.task_args ran a minute without a word, growing towards 9^9 values."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise YAMLSize(f"the alias at line {node.start_mark.line + 1} holds itself (a YAML node that contains its own "
                       f"anchor); write the value out")
    open_.add(key)
    children = (node.value if isinstance(node, yaml.SequenceNode) else
                [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
    size = 1 + sum(_expanded(child, sizes, open_) for child in children)
    open_.discard(key)
    if size > MAX_YAML_VALUES:
        raise YAMLSize(f"the value at line {node.start_mark.line + 1} expands to more than {MAX_YAML_VALUES:,} values "
                       f"through its aliases (*name); a config holds a few hundred: write it without them")
    sizes[key] = size
    return size


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What YAML found wrong and where (its first line, "while scanning for the next token", says neither)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if not problem:
        return str(e).splitlines()[0]
    context = getattr(e, "context", None)
    out = f"{context}, {problem}" if context and context.startswith("expected") else problem
    if mark is not None:
        out += f" at line {mark.line + 1} column {mark.column + 1}"
    if "'\\t'" in problem:
        out += "; indent with spaces, and write a space, not a tab, after a colon"
    return out


def _parse_value(text: str) -> Any:
    """An override's value read as YAML; text that is not YAML is kept as a string (``loops=uniform(1, 3)``)."""
    if not text.strip():
        return text  # "" or blank as given: data.doc_separator=$'\t' is a tab, not ""
    try:
        value = _yaml(text)
    except Refused as e:
        raise ConfigError(f"override value {text!r}: {e}") from None
    except yaml.YAMLError:
        return text
    if "\n" in text or "\r" in text:
        # YAML folds a line break inside a scalar into a space: run.name=$'a\nb' trained into runs/'a b' with no
        # word (#27 pass 37). A value whose text is not in the override as typed was folded
        folded = next((leaf for leaf in _string_leaves(value) if leaf not in text), None)
        if folded is not None:
            raise ConfigError(f"override value {text!r} holds a line break, which YAML reads as a space "
                              f"({folded!r}); write the value on one line")
    return value


def _string_leaves(value: Any) -> list[str]:
    """The strings in a parsed override value (nested lists and mappings, keys too)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _string_leaves(k) + _string_leaves(v)]
    if isinstance(value, list):
        return [s for v in value for s in _string_leaves(v)]
    return []


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> tuple[str | int, ...]:
    """Set ``a.b.0.c`` in a nested dict/list tree; a list of named items may be indexed by name
    (``model.stages.0.circuits.X.eval_loops=16``). Returns the path set, each list item by its index."""
    parts = dotted.split(".")
    node: Any = tree
    path: list[str | int] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            # named items: circuits by name, mixture entries by name (which defaults to their task)
            names = [item.get("name") or item.get("task") for item in node if isinstance(item, dict)]
            valid = f"0..{len(node) - 1}" + (f" or a name in {names}" if any(names) else "")
            if re.fullmatch(r"-[0-9]+", part):  # `model.stages.-1` set the last stage, Python's way; an index that
                # names a stage by two numbers (-1 and 0 of one stage) hid two overrides of one field (#27 pass 40's
                # leftover)
                raise ConfigError(f"override '{dotted}': '{where}' is a negative index; give {valid}")
            # ASCII digits: '٠' was read as index 0 by int()
            if re.fullmatch(r"[0-9]+", part) and int(part) < len(node):
                idx = int(part)
            elif part in names:
                idx = names.index(part)
            else:
                raise ConfigError(f"override '{dotted}': '{where}' is not an index {valid}")
            path.append(idx)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            path.append(part)
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[:i])}' is a value, not a mapping")
    return tuple(path)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        byte = not_utf8(item)
        if byte:  # run.name=$'r\xff' trained until tensorboard's writer raised UnicodeEncodeError, and a path in
            # data.paths was "expected a list" (#27 pass 33)
            shown = printable(item)
            raise ConfigError(f"override '{shown}' holds the byte {byte}, which is not UTF-8 text (a name in another "
                              f"encoding?); a run's settings are UTF-8 text: write it in UTF-8 (rename the file or "
                              f"folder it names)")
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or " " in key.strip():
            if item.endswith((".yaml", ".yml")) or Path(item).is_file():  # the config without its flag
                raise ConfigError(f"'{item}' is a config file, not a key=value override: give it with --config "
                                  f"(e.g. loopformer train -c {item})")
            if item[:1] in DASHES:  # `train –c cfg.yaml`, the flag pasted from a page, was "write key=value"
                raise ConfigError(f"'{item}' starts with '{item[0]}', a dash that is not a hyphen (pasted from a "
                                  f"page?); type the flag with hyphens: {plain_flag(item.split('=')[0])}")
            raise ConfigError(f"malformed override '{item}': write key=value, e.g. train.steps=200")
        out.append((key.strip(), _parse_value(text)))
    return out


def repeated_override(overrides: Sequence[str]) -> str | None:
    """Why a command line's ``key=value`` overrides cannot all be honoured (two set one key: the last won with no
    word), or None. Said of the user's own list: a script that layers its settings over theirs calls `load_config`."""
    seen: dict[str, str] = {}
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in seen:
            # quoted where one holds a line break or a tab: the one line was broken in two, and `train.steps=4\n`
            # beside `train.steps=4` read as the same override given twice (#27 pass 40)
            first, second = (o if o.isprintable() else repr(o) for o in (seen[key], item))
            return f"{first} and {second} both set {key}; give it once (the last one would win with no word)"
        seen[key] = item
    return None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, once: bool = False) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, then validate. With ``once`` (a user's own list), two
    overrides of one field by other spellings (``circuits.X`` and ``circuits.0``, ``stages.0`` and ``stages.00``), or
    one that replaces what an earlier one set (``model.stages.0.depth=3 model.stages=[...]``), are refused: the last
    one won with no word (`repeated_override` sees the same spelling only). A script that layers its settings over
    the user's leaves it off."""
    data: dict[str, Any] = Config().to_dict()
    if path is not None:
        p = Path(path)
        kind = not_a_file(p) if str(path) else "does not exist"  # (Path('') is the current directory)
        if kind:  # a FIFO is not read: with no writer it would wait forever
            raise ConfigError(f"config file {str(path) or repr('')} {kind}; pass --config with a path to a YAML file, "
                              f"e.g. configs/quickstart.yaml")
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            what = ("UTF-16 (it starts with a byte-order mark)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff")
                    else f"not UTF-8 text (bad byte at offset {e.start})")
            raise ConfigError(f"{p}: {what}; a config is a UTF-8 YAML file, e.g. configs/quickstart.yaml") from None
        if "\x00" in text:
            raise ConfigError(f"{p}: a binary file (it holds NUL bytes), not a YAML config; pass a YAML file such "
                              f"as configs/quickstart.yaml")
        try:
            loaded = _yaml(text)
        except Refused as e:
            raise ConfigError(f"{p}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({_yaml_problem(e)})") from None
        if loaded is None:
            raise ConfigError(f"{p} is empty: write the run's settings in it (see configs/quickstart.yaml), or "
                              f"leave out --config to train the defaults")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (run, model, data, train, ...)")
        data = _merge(data, loaded)
    done: list[tuple[tuple[str | int, ...], str]] = []
    for key, value in parse_overrides(overrides or []):
        where = _set_path(data, key, value)
        for path_set, earlier in done if once else ():
            if where == path_set:
                raise ConfigError(f"{earlier} and {key} both set {'.'.join(map(str, where))}; give it once (the last "
                                  f"one would win with no word)")
            if path_set[:len(where)] == where:
                raise ConfigError(f"{key} replaces all of {'.'.join(map(str, where))}, and with it what {earlier} "
                                  f"set before it (which would be lost with no word); give {earlier} after it, or "
                                  f"drop one")
        done.append((where, key))
    return config_from_dict(data)


def _merge(base: Any, new: Any) -> Any:
    """Deep-merge mappings; lists and scalars in ``new`` replace those in ``base``."""
    if isinstance(base, dict) and isinstance(new, dict):
        out = dict(base)
        for k, v in new.items():
            out[k] = _merge(base[k], v) if k in base and k not in ("task_args", "eval_splits") else v
        return out
    return new


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- differences


@dataclass(frozen=True)
class Change:
    """One setting that differs between two configs: its dotted path, the two values, and its part
    (architecture, task, schedule, behaviour or setting)."""

    path: str
    old: Any
    new: Any
    part: str

    def __str__(self) -> str:
        return f"{self.path}: {self.old!r} -> {self.new!r}"


_MODEL_PARTS = {f.name: f.metadata.get("part", BEHAVIOUR) for f in dataclasses.fields(ModelConfig)}


def part_of(path: str) -> str:
    """The part a dotted config path belongs to: ``model.stages.0.circuits.1.loops`` -> schedule."""
    keys = path.split(".")
    if keys[0] == "model" and len(keys) > 1:
        if keys[1] != "stages":
            return _MODEL_PARTS.get(keys[1], ARCHITECTURE)
        if len(keys) >= 6 and keys[5] == "halting":  # the head exists or not; its loss weights are settings
            return ARCHITECTURE if len(keys) == 6 or keys[6] == "kind" else SETTING
        if len(keys) >= 6:  # model.stages.S.circuits.C.field
            return CIRCUIT_PARTS.get(keys[5], ARCHITECTURE)
        if len(keys) >= 4 and keys[3] == "router":  # model.stages.S.router.field
            return ARCHITECTURE if len(keys) == 4 or keys[4] in ("kind", "exit", "inputs") else SETTING
        return ARCHITECTURE  # a stage or circuit added, removed or reordered
    if keys[0] == "data" and len(keys) > 1 and keys[1] in ("task", "task_args", "tokenizer", "vocab_size"):
        return TASK  # vocab_size: a BPE run's tokenizer and embedding are built at it; a resume cannot change it
    if keys[:2] == ["data", "mixture"]:  # data.mixture.NAME.field: the entries and their tasks stay, the rest may change
        return TASK if len(keys) <= 3 or keys[3] in ("task", "task_args", "name") else SETTING
    return SETTING


def _walk(a: Any, b: Any, path: str, out: list[Change]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            _walk(a.get(k), b.get(k), f"{path}.{k}" if path else str(k), out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and any(isinstance(x, dict) for x in a):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            named = isinstance(x, dict) and isinstance(y, dict) and x.get("name") and x.get("name") == y.get("name")
            _walk(x, y, f"{path}.{x['name'] if named else i}", out)  # circuits by name, as overrides write them
    elif a != b:
        out.append(Change(path, a, b, part_of(path)))


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every setting that differs between two config dicts (``Config.to_dict()``), leaf by leaf, in
    the order of the config, each with its part. Lists of mappings (stages, circuits) are compared item
    by item when their lengths agree (a circuit's path names it: ``model.stages.0.circuits.X.width``),
    and as one architecture change when they do not."""
    out: list[Change] = []
    _walk(old, new, "", out)
    return out


def circuit_label(path: str) -> str:
    """``model.stages.0.circuits.Y.loops`` -> ``loops of Y``; other paths unchanged."""
    keys = path.split(".")
    if len(keys) >= 6 and keys[:2] == ["model", "stages"] and keys[3] == "circuits":
        return f"{'.'.join(keys[5:])} of {keys[4]}"
    return path


__all__ = ["ARCHITECTURE", "BEHAVIOUR", "SCHEDULE", "SETTING", "TASK", "Change", "circuit_label", "config_changes",
           "config_from_dict", "load_config", "parse_overrides", "part_of"]

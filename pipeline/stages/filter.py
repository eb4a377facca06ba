"""`filter`: keep only the items whose size, shape, bytes, format and fields pass its rules.

It reads the record as it flows: `bytes` (put there by `download`), `width`, `height` and
`format` (by `decode`; the decoded, oriented image's size), `fields` (the list's other
columns) and `results` (what analysis stages measured). An item that passes every rule
goes on unchanged; one that breaks a rule is `skipped` at this stage with reason
`filtered`, the message naming the rule (`width 120 < min_width 256`), and no later stage
runs on it. Rules are checked in the order of the options below; the first broken one
is named. A rule that needs a value no stage upstream put in the record (`min_width`
before `decode`) fails the item (`transform_error`): that is a config mistake.

`where` is an expression over the record, parsed with `ast` and checked at validation
against a small grammar (never `eval`):

    expr    := expr "and" expr | expr "or" expr | "not" expr | "(" expr ")"
             | operand (cmp operand)+ | operand
    cmp     := "==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not in"
             | "is None" | "is not None"
    operand := path | literal | "[" operands "]" | "(" operands ")" | "{" operands "}"
    path    := NAME ("." NAME | "[" STRING_OR_INT "]")*   # a key path into the record
    literal := STRING | INT | FLOAT | True | False | None | "-" NUMBER

A path missing from the record (or running through a value that is not a dict or list)
is None; an ordering comparison that Python would refuse (None < 3, "a" < 3) is false,
and so is `in` a value that is not a container. Calls, attributes of literals,
subscripts of anything but a path, arithmetic, lambdas, comprehensions and names that
start with `__` are config errors that say which part is not allowed.
"""

from __future__ import annotations

import ast
import operator
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any

from pydantic import (
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from pipeline.config.model import Options
from pipeline.errors import ItemError, PipelineError
from pipeline.records import Item, Record
from pipeline.stages.base import Stage, Step, consumers_box
from pipeline.stages.registry import register

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # what `decode` may put in `format`
FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF", "MPO": "JPEG"}  # MPO: a JPEG with more frames

# (minimum option, maximum option, what the record gives, the stage that puts it there)
RANGES = (
    ("min_bytes", "max_bytes", "bytes", "download"),
    ("min_width", "max_width", "width", "decode"),
    ("min_height", "max_height", "height", "decode"),
    ("min_pixels", "max_pixels", "pixels", "decode"),
    ("min_aspect", "max_aspect", "aspect", "decode"),
)


class FilterOptions(Options):
    min_bytes: NonNegativeInt | None = Field(None, description="Smallest download, in bytes")
    max_bytes: PositiveInt | None = Field(None, description="Largest download, in bytes")
    min_width: PositiveInt | None = Field(None, description="Narrowest image, in pixels")
    max_width: PositiveInt | None = Field(None, description="Widest image, in pixels")
    min_height: PositiveInt | None = Field(None, description="Lowest image, in pixels")
    max_height: PositiveInt | None = Field(None, description="Tallest image, in pixels")
    min_pixels: PositiveInt | None = Field(None, description="Fewest pixels (width x height)")
    max_pixels: PositiveInt | None = Field(None, description="Most pixels (width x height)")
    min_aspect: PositiveFloat | None = Field(None, description="Smallest width / height")
    max_aspect: PositiveFloat | None = Field(None, description="Largest width / height")
    formats: tuple[str, ...] | None = Field(
        None, description=f"Image formats kept (of {', '.join(FORMATS)})"
    )
    where: str | None = Field(
        None,
        description="An expression on record fields, e.g. \"fields.license in ['cc0'] and "
        'width >= 256": and/or/not, comparisons, in, dotted paths, literals, lists',
    )

    @field_validator("formats", mode="before")
    @classmethod
    def _known_formats(cls, formats: object) -> object:
        if isinstance(formats, str):
            formats = [formats]
        if not isinstance(formats, list | tuple):
            return formats
        names = tuple(FORMAT_ALIASES.get(str(n).upper(), str(n).upper()) for n in formats)
        unknown = [name for name in names if name not in FORMATS]
        if unknown:
            raise ValueError(f"unknown format {unknown[0]!r} (known: {', '.join(FORMATS)})")
        if not names:
            raise ValueError("give at least one format")
        return names

    @field_validator("where")
    @classmethod
    def _valid_where(cls, where: str | None) -> str | None:
        if where is not None:
            parse_where(where)
        return where

    @model_validator(mode="after")
    def _ranges_and_rules(self) -> FilterOptions:
        for low, high, _, _ in RANGES:
            minimum, maximum = getattr(self, low), getattr(self, high)
            if minimum is not None and maximum is not None and minimum > maximum:
                raise ValueError(f"{low} ({minimum}) is larger than {high} ({maximum})")
        if all(value is None for value in self.model_dump().values()):
            raise ValueError(
                "give at least one rule: min_/max_ width, height, pixels, aspect or bytes, "
                "formats, or where"
            )
        return self


# --- the `where` expression language ---------------------------------------------------

COMPARISONS: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: operator.contains(b, a),
    ast.NotIn: lambda a, b: not operator.contains(b, a),
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
ORDERINGS = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
LITERALS = (str, int, float, bool, type(None))
MAX_DEPTH = 100  # nodes within nodes: checking and evaluating recurse this deep
# How the nodes a user is most likely to try are named in the error.
NOT_ALLOWED = {
    ast.Call: "function calls",
    ast.Lambda: "lambdas",
    ast.Subscript: "subscripts but of a record path by a string or integer literal",
    ast.BinOp: "arithmetic",
    ast.IfExp: "conditional expressions",
    ast.NamedExpr: "assignments",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.Dict: "dict literals",
    ast.Starred: "starred expressions",
    ast.JoinedStr: "f-strings",
    ast.Await: "await",
}


def parse_where(text: str) -> ast.Expression:
    """`text` parsed and checked against the grammar; ValueError naming what is wrong."""
    text = text.strip().replace("\n", " ")  # a YAML block may span lines
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as error:
        raise ValueError(f"invalid expression: {error.msg} (column {error.offset})") from None
    except (RecursionError, MemoryError):
        tree = None
    if tree is None or _depth(tree) > MAX_DEPTH:
        raise ValueError(f"'where' is nested more than {MAX_DEPTH} levels deep")
    _check(tree.body, text)
    return tree


def _depth(tree: ast.AST) -> int:
    """How deep the tree's nodes nest (without recursion: any depth is measured)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _check(node: ast.expr, text: str) -> None:
    def refuse(what: str) -> ValueError:
        return ValueError(f"'where' does not allow {what}: {ast.get_source_segment(text, node)}")

    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value, text)
    elif isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not):
            _check(node.operand, text)
        elif not (
            isinstance(node.op, ast.USub | ast.UAdd)
            and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) in (int, float)
        ):
            raise refuse("unary operators but 'not' and a number's sign")
    elif isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:], strict=False):
            if type(op) not in COMPARISONS:
                raise refuse(f"the operator {type(op).__name__}")
            if isinstance(op, ast.Is | ast.IsNot) and not any(
                isinstance(side, ast.Constant) and side.value is None for side in (left, right)
            ):
                raise refuse("'is' / 'is not' with anything but None")
        for operand in operands:
            _check(operand, text)
    elif isinstance(node, ast.Constant):
        if type(node.value) not in LITERALS:
            raise refuse(f"{type(node.value).__name__} literals")
    elif isinstance(node, ast.List | ast.Tuple | ast.Set):
        for element in node.elts:
            _check(element, text)
    elif isinstance(node, ast.Name | ast.Attribute | ast.Subscript):
        _path(node, text)
    else:
        raise refuse(NOT_ALLOWED.get(type(node), f"{type(node).__name__} expressions"))


def _path(node: ast.expr, text: str) -> tuple[str | int, ...]:
    """The keys of a record path (`fields.license`, `results['my-stats'].brightness`)."""
    keys: list[str | int] = []
    whole = node
    while True:
        if isinstance(node, ast.Attribute):
            keys.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            key = node.slice
            if (  # fields.tags[-1]
                isinstance(key, ast.UnaryOp)
                and isinstance(key.op, ast.USub)
                and isinstance(key.operand, ast.Constant)
                and type(key.operand.value) is int
            ):
                key = ast.Constant(-key.operand.value)
            if not (isinstance(key, ast.Constant) and type(key.value) in (str, int)):
                segment = ast.get_source_segment(text, node)
                raise ValueError(f"'where' does not allow {NOT_ALLOWED[ast.Subscript]}: {segment}")
            keys.append(key.value)
            node = node.value
        elif isinstance(node, ast.Name):
            keys.append(node.id)
            break
        else:  # (1).real, [1, 2][0], f(x).y
            segment = ast.get_source_segment(text, whole)
            raise ValueError(
                f"'where' does not allow attributes or subscripts of anything but a record "
                f"path: {segment}"
            )
    for key in keys:
        if isinstance(key, str) and key.startswith("__"):
            raise ValueError(f"'where' does not allow names starting with '__': {key}")
    return tuple(reversed(keys))


def lookup(record: Record, keys: tuple[str | int, ...]) -> Any:
    """The value at `keys` in the record, or None where the path ends early."""
    value: Any = record
    for key in keys:
        if isinstance(value, dict) and isinstance(key, str):
            value = value.get(key)
        elif isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
            value = value[key]
        else:
            return None
    return value


def evaluate(node: ast.expr, record: Record) -> Any:
    """The value of a checked expression on `record` (see the module's grammar)."""
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(evaluate(value, record) for value in node.values)
        return any(evaluate(value, record) for value in node.values)
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not):
            return not evaluate(node.operand, record)
        value = evaluate(node.operand, record)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Compare):
        left = evaluate(node.left, record)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = evaluate(comparator, record)
            if not _compare(op, left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        return [evaluate(element, record) for element in node.elts]
    return lookup(record, _path(node, ""))


def _compare(op: ast.cmpop, left: Any, right: Any) -> bool:
    if isinstance(op, ORDERINGS) and (left is None or right is None):
        return False
    try:
        return bool(COMPARISONS[type(op)](left, right))
    except TypeError:  # "a" < 3, 3 in None: false; `not in` what cannot contain: true
        return isinstance(op, ast.NotIn)


def path_nodes(node: ast.expr) -> list[ast.expr]:
    """The record paths in `node` (whole paths, not their prefixes), in order."""
    if isinstance(node, ast.Name | ast.Attribute | ast.Subscript):
        return [node]
    return [
        path
        for child in ast.iter_child_nodes(node)
        if isinstance(child, ast.expr)
        for path in path_nodes(child)
    ]


# --- the stage -------------------------------------------------------------------------


@register("filter")
class Filter(Step[FilterOptions]):
    """Skip the items that break a rule (reason `filtered`); pass the others on unchanged."""

    Options = FilterOptions
    description = "Keep items by size, aspect, pixels, bytes, format or an expression"

    box: tuple[int, int] | None = None
    fitted = False

    def connect(self, consumers: list[Stage]) -> None:
        self.box, self.fitted = consumers_box(consumers)

    def preferred_input_size(self) -> tuple[int, int] | None:
        """What its consumers prefer: a filter passes images on unchanged, so a decoder
        before it may still draft them (sizes in the record are the full ones)."""
        return self.box

    def fits_inside_preferred_size(self) -> bool:
        return self.fitted

    @cached_property
    def where(self) -> ast.Expression | None:
        """The parsed `where`, checked when the options were validated."""
        return None if self.options.where is None else parse_where(self.options.where)

    def run_one(self, item: Item) -> Item | None:
        """The item if it passes; else None, its record marked skipped (never failed)."""
        started = time.perf_counter()
        try:
            broken = self.broken_rule(item.record)
        except ItemError as error:
            item.fail(self.name, error)
            return None
        except PipelineError:
            raise
        except Exception as error:  # a bug: record it on the item, go on
            item.fail(self.name, ItemError("internal_error", f"{type(error).__name__}: {error}"))
            return None
        finally:
            timings = item.record["timings"]
            timings[self.name] = round(
                timings.get(self.name, 0.0) + time.perf_counter() - started, 6
            )
        if broken is None:
            return item
        if item.record["status"] == "ok":  # a failure on another branch stays the record's
            item.record.update(
                status="skipped", stage=self.name, reason="filtered", message=broken[:500]
            )
        return None

    def process(self, item: Item) -> Item:
        """The item, whatever the rules say: `run_one` is what skips (a skip is no error)."""
        return item

    def broken_rule(self, record: Record) -> str | None:
        """The first rule `record` breaks, said as a message; None if it passes them all."""
        options = self.options
        if options.formats is not None:
            found = self._needed(record, "format", "formats", "decode")
            if FORMAT_ALIASES.get(found, found) not in options.formats:
                return f"format {found} not in formats [{', '.join(options.formats)}]"
        for low, high, measure, stage in RANGES:
            minimum, maximum = getattr(options, low), getattr(options, high)
            if minimum is None and maximum is None:
                continue
            value = self._measure(record, measure, low if minimum is not None else high, stage)
            if minimum is not None and value < minimum:
                return f"{measure} {_number(value)} < {low} {minimum}"
            if maximum is not None and value > maximum:
                return f"{measure} {_number(value)} > {high} {maximum}"
        where = self.where
        if where is not None:
            body = where.body
            # `a and b`: name the first clause that is false
            clauses = (
                body.values
                if isinstance(body, ast.BoolOp) and isinstance(body.op, ast.And)
                else [body]
            )
            for clause in clauses:
                if not evaluate(clause, record):
                    return _where_message(clause, record)
        return None

    def _measure(self, record: Record, measure: str, option: str, stage: str) -> float:
        if measure == "pixels":
            return self._needed(record, "width", option, stage) * record["height"]
        if measure == "aspect":
            return self._needed(record, "width", option, stage) / record["height"]
        return self._needed(record, measure, option, stage)

    def _needed(self, record: Record, key: str, option: str, stage: str) -> Any:
        value = record.get(key)
        if value is None or (key == "width" and record.get("height") is None):
            raise ItemError(
                "transform_error",
                f"{self.name}: {option} needs the record's {key}: put the filter after {stage}",
            )
        return value


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _where_message(clause: ast.expr, record: Record) -> str:
    shown: dict[str, Any] = {}
    for path in path_nodes(clause):
        shown.setdefault(ast.unparse(path), lookup(record, _path(path, "")))
    values = ", ".join(f"{name}={value!r}" for name, value in shown.items())
    return f"where {ast.unparse(clause)} is false" + (f" ({values})" if values else "")

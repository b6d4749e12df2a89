"""One command-line flag per field of an args dataclass (`RLHFArgs`, `DPOArgs`, ...), with its
docstring as the help."""

import argparse
import ast
import dataclasses
import inspect
import typing

from minirlhf.args import RLHFArgs


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each dataclass field, read from the source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            if isinstance(following.value, ast.Constant):
                docs[node.target.id] = str(following.value.value).strip()
    return docs


def parse_optional(kind: type):
    """An argparse type for `kind | None`: "none" gives None."""

    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_args_flags(parser: argparse.ArgumentParser, cls: type = RLHFArgs,
                   title: str = "RLHFArgs (override the preset)"):
    """One flag per field of the dataclass `cls` (`--base-lr`, ...), defaulting to "not given"."""
    docs = field_docs(cls)
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        flag, hint = "--" + field.name.replace("_", "-"), hints[field.name]
        options = {"default": argparse.SUPPRESS, "dest": field.name,
                   "help": docs.get(field.name, "")}
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif typing.get_origin(hint) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(hint), **options)
        elif args and len(args) < len(typing.get_args(hint)):  # X | None
            group.add_argument(flag, type=parse_optional(args[0]), metavar=args[0].__name__.upper(),
                               **options)
        else:
            group.add_argument(flag, type=hint, **options)

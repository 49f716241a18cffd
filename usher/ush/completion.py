"""Tab completion of VM, VMM and image names, and the cmd2 kit that wires it into ush's
parsers.

:class:`Cmd2Kit` is the interactive shell's :class:`~usher.ush.parsers.ParserKit`:
it builds each verb's parser as a ``Cmd2ArgumentParser`` (cmd2's help layout)
and gives name arguments a ``choices_provider``. :func:`cmd2_parser` turns a
verb's builder into the zero-argument parser factory ``with_argparser`` takes,
so cmd2 builds a parser only when a command first needs it.

The providers are standalone cmd2 ``choices_provider`` functions: cmd2 calls
one with the app as its first argument and, because it takes
``arg_tokens``, the tokens typed so far, the last of which is the word being
completed. They ask the controller (``session.complete``) through the app's
session, which returns nothing at once when there is no connection, so
pressing Tab never hangs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cmd2 import Choices, Cmd2ArgumentParser, RawDescriptionCmd2HelpFormatter

from usher.ush.parsers import ParserKit

if TYPE_CHECKING:
    from usher.ush.shell import UshApp

__all__ = ["CMD2_KIT", "Cmd2Kit", "cmd2_parser", "host_name_choices", "image_name_choices",
           "initrd_image_choices", "kernel_image_choices", "vm_name_choices"]


def _typed(arg_tokens: dict[str, list[str]], dest: str) -> str:
    tokens = arg_tokens.get(dest) or [""]
    return tokens[-1]


def vm_name_choices(app: UshApp, arg_tokens: dict[str, list[str]]) -> Choices:
    """The caller's VM names (as ``list`` shows them) for a ``names`` argument."""
    return Choices.from_values(app.session.complete_names("vm", _typed(arg_tokens, "names")),
                               is_sorted=True)


def host_name_choices(app: UshApp, arg_tokens: dict[str, list[str]]) -> Choices:
    """VMM names for a ``--vmm`` option or a ``name`` argument."""
    typed = _typed(arg_tokens, "vmm") if "vmm" in arg_tokens else _typed(arg_tokens, "name")
    return Choices.from_values(app.session.complete_names("host", typed), is_sorted=True)


def _images(app: UshApp, arg_tokens: dict[str, list[str]], dest: str) -> Choices:
    return Choices.from_values(app.session.complete_names("image", _typed(arg_tokens, dest)),
                               is_sorted=True)


# One provider per option: cmd2 hands a provider the tokens of every option
# typed so far, not which option is being completed.
def image_name_choices(app: UshApp, arg_tokens: dict[str, list[str]]) -> Choices:
    """Registered image names for ``--image``."""
    return _images(app, arg_tokens, "image")


def kernel_image_choices(app: UshApp, arg_tokens: dict[str, list[str]]) -> Choices:
    """Registered image names for ``--kernel``."""
    return _images(app, arg_tokens, "kernel")


def initrd_image_choices(app: UshApp, arg_tokens: dict[str, list[str]]) -> Choices:
    """Registered image names for ``--initrd``."""
    return _images(app, arg_tokens, "initrd")


_IMAGE_CHOICES = {"image": image_name_choices, "kernel": kernel_image_choices,
                  "initrd": initrd_image_choices}


class Cmd2Kit:
    """The interactive shell's kit: cmd2 parsers with name completion."""

    def parser(self, prog: str, description: str) -> Cmd2ArgumentParser:
        return Cmd2ArgumentParser(prog=prog, description=description,
                                  formatter_class=RawDescriptionCmd2HelpFormatter)

    def vm_names(self) -> dict[str, Any]:
        return {"choices_provider": vm_name_choices}

    def host_names(self) -> dict[str, Any]:
        return {"choices_provider": host_name_choices}

    def image_names(self, dest: str) -> dict[str, Any]:
        return {"choices_provider": _IMAGE_CHOICES[dest]}


CMD2_KIT = Cmd2Kit()


def cmd2_parser(build: Callable[[ParserKit[Cmd2ArgumentParser]], Cmd2ArgumentParser],
                ) -> Callable[[], Cmd2ArgumentParser]:
    """The parser factory for ``with_argparser`` of the verb ``build`` makes."""
    return lambda: build(CMD2_KIT)

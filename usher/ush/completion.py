"""Tab completion of VM and VMM names for ush's argparse parsers.

These are cmd2 ``choices_provider`` functions: cmd2 calls a standalone
provider with the app as its first argument and, because the provider takes
``arg_tokens``, the tokens typed so far, the last of which is the word being
completed. They ask the controller (``session.complete``) through the app,
which returns nothing at once when there is no connection, so pressing Tab
never hangs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cmd2 import Choices

if TYPE_CHECKING:
    from usher.ush.shell import UshApp

__all__ = ["host_name_choices", "vm_name_choices"]


def _typed(arg_tokens: dict[str, list[str]], dest: str) -> str:
    tokens = arg_tokens.get(dest) or [""]
    return tokens[-1]


def vm_name_choices(app: UshApp, arg_tokens: dict[str, list[str]]) -> Choices:
    """The caller's VM names (as ``list`` shows them) for a ``names`` argument."""
    return Choices.from_values(app.complete_names("vm", _typed(arg_tokens, "names")),
                               is_sorted=True)


def host_name_choices(app: UshApp, arg_tokens: dict[str, list[str]]) -> Choices:
    """VMM names for a ``--vmm`` option or a ``name`` argument."""
    typed = _typed(arg_tokens, "vmm") if "vmm" in arg_tokens else _typed(arg_tokens, "name")
    return Choices.from_values(app.complete_names("host", typed), is_sorted=True)

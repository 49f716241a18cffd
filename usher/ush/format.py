"""What ush prints: names, task lines, tables and JSON, as pure functions.

Nothing here does I/O or knows about the shell: each function turns wire data
(:mod:`usher.protocol.ops` structs) into text, so the output is tested
without a controller. VM names are shown relative to the user's own domain
``USER.SITE`` (``redfish.sneetch`` for ``redfish.sneetch.seuss.usher.org``)
and as full FQDNs otherwise, the way the user types them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from usher.protocol.ops import HostInfo, ImageInfo, TaskInfo, VmInfo, VmRates, VmStateMsg, VmStats

__all__ = [
    "SHORT_ID",
    "format_duration",
    "format_size",
    "host_table",
    "image_table",
    "relative_name",
    "render_table",
    "short_id",
    "stats_table",
    "task_accepted_line",
    "task_completion_line",
    "task_table",
    "to_json",
    "verb_of",
    "vm_state_line",
    "vm_table",
]

SHORT_ID = 8
"""Characters of a task id shown in lines and tables (``wait`` takes a prefix)."""

_NONE = "-"


def relative_name(name: str, domain: str | None) -> str:
    """``name`` relative to ``domain`` when it lies under it, else unchanged.

    Comparison ignores case and a trailing dot; a name equal to the domain
    itself stays whole (it is not a VM of the user's).
    """
    if not domain:
        return name
    folded = name.rstrip(".").lower()
    suffix = "." + domain.rstrip(".").lower()
    if folded.endswith(suffix) and len(folded) > len(suffix):
        return name.rstrip(".")[: -len(suffix)]
    return name


def short_id(task_id: str) -> str:
    return task_id[:SHORT_ID]


def verb_of(op: str) -> str:
    """The user's verb for an operation name: ``vm.start`` -> ``start``."""
    return op.split(".", 1)[1] if "." in op else op


def task_accepted_line(info: TaskInfo, domain: str | None) -> str:
    """``task 3f2a1b2c start redfish.sneetch: accepted``."""
    return (f"task {short_id(info.id)} {verb_of(info.op)} "
            f"{relative_name(info.vm, domain)}: accepted")


def task_completion_line(info: TaskInfo, domain: str | None) -> tuple[str, bool]:
    """The line announcing an ended task and whether it failed.

    ``redfish.sneetch: start done (running)`` or
    ``redfish.sneetch: start FAILED: no host has 512 MiB free``.
    """
    name = relative_name(info.vm, domain)
    verb = verb_of(info.op)
    if info.state == "error":
        return f"{name}: {verb} FAILED: {info.message or 'no reason given'}", True
    state = f" ({info.vm_state})" if info.vm_state else ""
    # A message that says more than the state (a cold migration, a no-op) is shown.
    note = f": {info.message}" if info.message and info.message not in (
        info.vm_state, info.state, "destroyed") else ""
    return f"{name}: {verb} {info.state}{state}{note}", False


def vm_state_line(msg: VmStateMsg, domain: str | None) -> str:
    """A VM that changed state on its own: ``redfish: now stopped (guest powered off)``."""
    reason = f" ({msg.reason})" if msg.reason else ""
    where = f" on {msg.host}" if msg.host and msg.state == "running" else ""
    return f"{relative_name(msg.name, domain)}: now {msg.state}{where}{reason}"


def format_duration(seconds: float | None) -> str:
    """A short human duration: ``45s``, ``12m30s``, ``3h05m``, ``2d04h``; ``-`` for none."""
    if seconds is None or seconds < 0:
        return _NONE
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]],
                 right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell, two spaces apart.

    Columns whose index is in ``right`` are right-aligned (numbers). Trailing
    blanks are trimmed from every line; there is no line after the last row.
    """
    body = [list(map(str, row)) for row in rows]
    right_cols = set(right)
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *body]:
        cells = [cell.rjust(widths[i]) if i in right_cols else cell.ljust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _uptime(vm: VmInfo, now: float) -> str:
    if vm.state not in ("running", "paused") or vm.started is None:
        return _NONE
    return format_duration(now - vm.started)


def vm_table(vms: Sequence[VmInfo], domain: str | None, now: float, *,
             long: bool = False) -> str:
    """The ``list`` table: NAME STATE HOST IP RAM VCPUS UPTIME REASON.

    ``long`` adds CPU% and MEM (the VM's use at the last accounting sample:
    ``-`` when none is current), then OWNER, CLUSTER, MAC, UUID, DNS (``ok``,
    ``pending``, and ``+rr`` for round-robin members) and IMAGE (the one it
    was started from) before REASON. RAM is in MiB. Records
    still waiting for the DNS server show as ``DNS pending`` in REASON.
    """
    headers = ["NAME", "STATE", "HOST", "IP", "RAM", "VCPUS", "UPTIME"]
    if long:
        headers += ["CPU%", "MEM", "OWNER", "CLUSTER", "MAC", "UUID", "DNS", "IMAGE"]
    headers.append("REASON")
    rows = []
    for vm in sorted(vms, key=lambda v: v.name):
        row = [relative_name(vm.name, domain), vm.state, vm.host or _NONE, vm.ip or _NONE,
               f"{vm.memory_mib}M", str(vm.vcpus), _uptime(vm, now)]
        if long:
            dns = (vm.dns or _NONE) + ("+rr" if vm.rr else "")
            row += [_pct(vm.cpu_pct), _size_kib(vm.mem_kib)]
            row += [vm.owner, relative_name(vm.cluster, domain), vm.mac, vm.uuid, dns,
                    vm.image or _NONE]
        reason = vm.reason
        if vm.dns == "pending":
            reason = f"DNS pending; {reason}" if reason else "DNS pending"
        row.append(reason)
        rows.append(row)
    return render_table(headers, rows, right=(4, 5, 7, 8) if long else (4, 5))


def host_table(hosts: Sequence[HostInfo]) -> str:
    """The ``vmm_list`` table: NAME STATE CPUS MEM(MiB) USED VMS, and VLANS and
    STORE when any host declares VLANs or a shared image store.

    USED is the memory (MiB) and vcpus taken by VMs: ``1024M/2``.
    """
    with_vlans = any(h.vlans for h in hosts)
    with_stores = any(h.shared_store for h in hosts)
    rows = []
    for h in sorted(hosts, key=lambda h: h.name):
        row = [h.name, h.state, str(h.cpus), str(h.memory_mib),
               f"{h.used_memory_mib}M/{h.used_vcpus}", str(h.vm_count)]
        if with_vlans:
            row.append(",".join(map(str, h.vlans)) or _NONE)
        if with_stores:
            row.append(h.shared_store or _NONE)
        rows.append(row)
    headers = ["NAME", "STATE", "CPUS", "MEM(MiB)", "USED", "VMS"]
    return render_table(headers + ["VLANS"] * with_vlans + ["STORE"] * with_stores, rows,
                        right=(2, 3, 4, 5))


def image_table(images: Sequence[ImageInfo]) -> str:
    """The ``image_list`` table: NAME DISK KERNEL INITRD DESCRIPTION.

    DISK is the disk's format (``qcow2``, ``raw``) or ``-``; KERNEL and
    INITRD are ``yes`` or ``-``.
    """
    rows = [[i.name, i.disk_format or _NONE, "yes" if i.kernel else _NONE,
             "yes" if i.initrd else _NONE, i.description]
            for i in sorted(images, key=lambda i: i.name)]
    return render_table(["NAME", "DISK", "KERNEL", "INITRD", "DESCRIPTION"], rows)


def task_table(tasks: Sequence[TaskInfo], domain: str | None, now: float) -> str:
    """The ``tasks`` table, newest first: ID OP NAME STATE AGE MESSAGE."""
    rows = []
    for t in tasks:
        message = t.message or t.progress
        if t.state == "done" and t.vm_state and not message:
            message = t.vm_state
        age = format_duration(now - t.created) if t.created else _NONE
        rows.append([short_id(t.id), verb_of(t.op), relative_name(t.vm, domain), t.state,
                     age, message])
    return render_table(["ID", "OP", "NAME", "STATE", "AGE", "MESSAGE"], rows)


def format_size(n: float | None) -> str:
    """Bytes in binary units, short: ``512``, ``1.5K``, ``12K``, ``210M``; ``-`` for none."""
    if n is None:
        return _NONE
    value = float(n)
    for unit in ("", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            break
        value /= 1024
    if unit == "":
        return f"{value:.0f}"
    return f"{value:.1f}{unit}" if abs(value) < 10 else f"{value:.0f}{unit}"


def _size_kib(kib: int | None) -> str:
    return format_size(kib * 1024 if kib is not None else None)


def _pct(pct: float | None) -> str:
    return _NONE if pct is None else f"{pct:.1f}"


_STATS_HEADERS = ["NAME", "CPU%", "MEM", "DISK-R/s", "DISK-W/s", "NET-IN/s", "NET-OUT/s"]


def _stats_cells(rates: VmRates | None, mem_kib: int | None) -> list[str]:
    if rates is None:
        return [_NONE, _size_kib(mem_kib), _NONE, _NONE, _NONE, _NONE]
    return [_pct(rates.cpu_pct), _size_kib(rates.mem_kib), format_size(rates.disk_rd_bps),
            format_size(rates.disk_wr_bps), format_size(rates.net_rx_bps),
            format_size(rates.net_tx_bps)]


def stats_table(stats: Sequence[VmStats], domain: str | None, *, average: bool = False) -> str:
    """The ``stats`` table: NAME CPU% MEM DISK-R/s DISK-W/s NET-IN/s NET-OUT/s, and TOTAL.

    Each VM's rates over its last interval, or with ``average`` over all its
    samples returned. CPU% counts one host CPU as 100; MEM is the memory it
    uses (host memory held where known); sizes in binary units. A VM without
    two samples yet shows ``-``. TOTAL (with more than one VM) sums the VMs
    that have figures.
    """
    rows = []
    total = [0.0] * 6
    counted = 0
    for vm in sorted(stats, key=lambda v: v.name):
        rates = vm.average if average else vm.rates
        last = vm.samples[-1] if vm.samples else None
        mem = rates.mem_kib if rates is not None else (
            (last.rss_kib if last.rss_kib is not None else last.memory_kib) if last else None)
        rows.append([relative_name(vm.name, domain), *_stats_cells(rates, mem)])
        if rates is not None:
            counted += 1
            for i, value in enumerate((rates.cpu_pct, rates.mem_kib, rates.disk_rd_bps,
                                       rates.disk_wr_bps, rates.net_rx_bps, rates.net_tx_bps)):
                total[i] += value
    if len(stats) > 1:
        if counted:
            rows.append(["TOTAL", _pct(total[0]), _size_kib(int(total[1])),
                         *(format_size(v) for v in total[2:])])
        else:
            rows.append(["TOTAL", *[_NONE] * 6])
    return render_table(_STATS_HEADERS, rows, right=range(1, 7))


def _plain(value: Any) -> Any:
    """Wire data as JSON-ready builtins, every struct field present, nested ones too."""
    if isinstance(value, msgspec.Struct):
        return {f: _plain(getattr(value, f)) for f in value.__struct_fields__}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_json(items: Sequence[msgspec.Struct]) -> str:
    """A JSON array of wire structs with every field present (for scripts).

    The wire omits fields at their defaults; scripts get a stable shape
    instead: every field of the struct (and of the structs in it), ``null``
    where unset.
    """
    data = [_plain(item) for item in items]
    return msgspec.json.format(msgspec.json.encode(data), indent=2).decode()

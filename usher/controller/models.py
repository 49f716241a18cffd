"""SQL schema of the controller's state (SQLAlchemy 2 declarative models).

Dumb data: the models hold columns and nothing else; every rule lives in the
service layer. The schema changes only through Alembic migrations in
``usher/controller/migrations``; a test checks the models and the migrations
agree.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    """A person of the embedded user store (until a directory is configured)."""

    __tablename__ = "users"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    site_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    usher: Mapped[bool] = mapped_column(Boolean, default=True)  # may create VMs
    created: Mapped[float] = mapped_column(Float)


class Host(Base):
    """A physical host (VMM) that a node manager has registered."""

    __tablename__ = "hosts"
    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))  # up | disabled | lost
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    hypervisor: Mapped[str] = mapped_column(String(255), default="")
    cpus: Mapped[int] = mapped_column(Integer, default=0)
    memory_mib: Mapped[int] = mapped_column(Integer, default=0)
    live_migration: Mapped[bool] = mapped_column(Boolean, default=False)
    managed_save: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[float] = mapped_column(Float, default=0.0)


class Vm(Base):
    """A VM usher placed: its identity, size, owner and last known state."""

    __tablename__ = "vms"
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    cluster: Mapped[str] = mapped_column(String(253), index=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    host: Mapped[str | None] = mapped_column(String(253), nullable=True, index=True)
    state: Mapped[str] = mapped_column(String(16))
    memory_mib: Mapped[int] = mapped_column(Integer)
    vcpus: Mapped[int] = mapped_column(Integer)
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    ip: Mapped[str | None] = mapped_column(String(45), nullable=True)
    rr: Mapped[bool] = mapped_column(Boolean, default=False)  # in its cluster's round robin
    since: Mapped[float] = mapped_column(Float)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[float] = mapped_column(Float)
    # What it was started with: the start options as given and the resolved
    # boot (JSON, see usher.controller.images.BootRecord); NULL: nothing to boot.
    boot: Mapped[str | None] = mapped_column(Text, nullable=True)


class Transition(Base):
    """Every VM state change with its cause (kept after the VM is destroyed)."""

    __tablename__ = "transitions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vm_uuid: Mapped[str] = mapped_column(String(36), index=True)
    vm_name: Mapped[str] = mapped_column(String(253))
    time: Mapped[float] = mapped_column(Float)
    old: Mapped[str] = mapped_column(String(16))
    new: Mapped[str] = mapped_column(String(16))
    cause: Mapped[str] = mapped_column(Text)


class Task(Base):
    """One operation on one VM or host, journaled before anything is dispatched."""

    __tablename__ = "tasks"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    op: Mapped[str] = mapped_column(String(32))
    user: Mapped[str] = mapped_column(String(64), index=True)
    vm_uuid: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    vm_name: Mapped[str] = mapped_column(String(253))
    state: Mapped[str] = mapped_column(String(16), index=True)  # running | done | error
    step: Mapped[str] = mapped_column(String(32), default="")
    host: Mapped[str | None] = mapped_column(String(253), nullable=True)  # where it acts
    target: Mapped[str | None] = mapped_column(String(253), nullable=True)  # migrate target
    created_vm: Mapped[bool] = mapped_column(Boolean, default=False)
    message: Mapped[str] = mapped_column(Text, default="")
    vm_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created: Mapped[float] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)


class IpRange(Base):
    """A range of addresses VMs are given (issue 4); ``access`` is a JSON object
    ``{"users": [...], "groups": [...]}`` naming who may use it (``*``: everyone)."""

    __tablename__ = "ip_ranges"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    cidr: Mapped[str] = mapped_column(String(49))
    gateway: Mapped[str | None] = mapped_column(String(45), nullable=True)
    vlan: Mapped[int | None] = mapped_column(Integer, nullable=True)
    family: Mapped[int] = mapped_column(Integer)  # 4 or 6
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    access: Mapped[str] = mapped_column(Text, default='{"users": ["*"], "groups": []}')
    created: Mapped[float] = mapped_column(Float)


class Image(Base):
    """An image site admins registered (issue 5): a disk and/or a kernel (and initrd),
    each by URL and SHA-256; the disk's format is pinned here, never guessed."""

    __tablename__ = "images"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    disk_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    disk_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    disk_format: Mapped[str | None] = mapped_column(String(16), nullable=True)  # qcow2 | raw
    kernel_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    kernel_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    initrd_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    initrd_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cmdline: Mapped[str] = mapped_column(Text, default="")  # kernel command line
    description: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[float] = mapped_column(Float)


class Lease(Base):
    """An address of a range held by one VM, written with the VM's row."""

    __tablename__ = "leases"
    address: Mapped[str] = mapped_column(String(45), primary_key=True)
    range_name: Mapped[str] = mapped_column(String(64), index=True)
    vm_uuid: Mapped[str] = mapped_column(String(36), unique=True)
    created: Mapped[float] = mapped_column(Float)


class RequestRecord(Base):
    """The reply to a mutation, kept so a resent request id returns it again."""

    __tablename__ = "requests"
    user: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    op: Mapped[str] = mapped_column(String(32))
    reply: Mapped[bytes] = mapped_column(LargeBinary)
    created: Mapped[float] = mapped_column(Float, index=True)


class JoinToken(Base):
    """A one-time, short-lived token a new host exchanges for its certificate."""

    __tablename__ = "join_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(253))
    expires: Mapped[float] = mapped_column(Float)
    used: Mapped[bool] = mapped_column(Boolean, default=False)


class Outbox(Base):
    """Writes to other systems (DNS, LDAP), replayed until they succeed."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    task_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("tasks.id"),
                                                nullable=True)
    created: Mapped[float] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_try: Mapped[float] = mapped_column(Float)
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    last_error: Mapped[str] = mapped_column(Text, default="")


class Event(Base):
    """The audit trail: every event fired, with who and what."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[float] = mapped_column(Float)
    name: Mapped[str] = mapped_column(String(64))
    user: Mapped[str | None] = mapped_column(String(64), nullable=True)
    subject: Mapped[str | None] = mapped_column(String(253), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")


class VmStat(Base):
    """One sample of a VM's resource counters (accounting, issue 5).

    The counters are cumulative since the VM's current boot, as its host
    reports them. At most ``stats_keep`` rows per VM, the oldest dropped as
    new ones come; the rows go with the VM when it is destroyed.
    """

    __tablename__ = "vm_stats"
    # 64-bit where the database has it: a busy site inserts billions of samples
    # over the years. SQLite's rowid (INTEGER PRIMARY KEY) is 64-bit anyway.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    vm_uuid: Mapped[str] = mapped_column(String(36))
    time: Mapped[float] = mapped_column(Float)  # when the controller received it
    cpu_ns: Mapped[int] = mapped_column(BigInteger)
    memory_kib: Mapped[int] = mapped_column(BigInteger)  # memory the guest has
    rss_kib: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # host memory held
    disk_rd: Mapped[int] = mapped_column(BigInteger)  # bytes
    disk_wr: Mapped[int] = mapped_column(BigInteger)
    net_rx: Mapped[int] = mapped_column(BigInteger)  # received by the guest
    net_tx: Mapped[int] = mapped_column(BigInteger)


Index("ix_tasks_user_created", Task.user, Task.created)
Index("ix_vm_stats_vm_uuid_time", VmStat.vm_uuid, VmStat.time)

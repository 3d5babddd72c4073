"""Kernel-level isolation of the sandbox worker: namespaces, the chroot jail, uid nobody, rlimits.

This is the security boundary of the sandbox (the Python-level guard in ``guard.py`` is defence
in depth): resource limits, Linux namespaces, a chroot jail on a private tmpfs and an
unprivileged user.  Everything here degrades gracefully: each step is attempted, and what was
really applied is reported (``Sandbox.isolation()``), never assumed.

Standard library only, and no imports from the project: the worker process imports it without
the rest of the project (see ``host._BOOTSTRAP``).
"""

from __future__ import annotations

import os
import resource
import signal
import sys

# Linux primitives through libc (Python 3.11 has no os.unshare; mount/chroot flags are not in os).
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
NOBODY = 65534

_libc = None


def load_libc() -> None:
    """Load libc through ctypes now (in the worker, before any jail or fork) rather than per action."""
    global _libc
    import ctypes  # trusted worker code only; user code can never import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)


def _libc_call(name: str, *args) -> None:
    """Call a libc function returning 0/-1 and raise OSError with errno on failure."""
    import ctypes

    load_libc()
    if getattr(_libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def unshare(flags: int) -> None:
    """unshare(2)."""
    _libc_call("unshare", flags)


def set_no_new_privs() -> None:
    """Forbid gaining privileges through execve (setuid binaries, file capabilities)."""
    _libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies."""
    _libc_call("prctl", PR_SET_PDEATHSIG, signum, 0, 0, 0)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def encode(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    _libc_call("mount", encode(source), encode(target), encode(fstype), flags, encode(data))


def enter_namespaces(network: str) -> tuple[int, dict[str, str]]:
    """Move this process into new namespaces; return the CLONE_* flags taken and a report of them.

    ``network`` is the config value: ``"namespace"`` demands a network namespace (OSError if the
    kernel refuses), ``"auto"`` takes one when permitted, ``"none"`` leaves the network alone.
    As root we take net + mount + pid namespaces (the mount namespace lets us build the jail
    without touching the host's mount table); unprivileged we try a user namespace holding only a
    network namespace.  A new pid namespace applies to children: the caller must fork next.
    """
    want_net = network != "none"
    attempts = []
    if os.geteuid() == 0:
        attempts.append(CLONE_NEWNS | CLONE_NEWPID | (CLONE_NEWNET if want_net else 0))
        attempts.append(CLONE_NEWNS | CLONE_NEWPID)
    elif want_net:
        attempts.append(CLONE_NEWUSER | CLONE_NEWNET)
    errors = []
    for flags in attempts:
        if want_net and network == "namespace" and not flags & CLONE_NEWNET:
            continue
        try:
            unshare(flags)
        except OSError as exc:
            errors.append(str(exc))
            continue
        names = [n for f, n in ((CLONE_NEWUSER, "user"), (CLONE_NEWNS, "mount"), (CLONE_NEWPID, "pid"),
                                (CLONE_NEWNET, "net")) if flags & f]
        net = "off (network namespace, interfaces: lo only, down)" if flags & CLONE_NEWNET else "not isolated"
        return flags, {"network": net, "namespaces": "+".join(names)}
    if network == "namespace":
        raise OSError(f"network='namespace' requested but unshare(CLONE_NEWNET) failed: {errors}")
    if errors:
        reason = "; ".join(dict.fromkeys(errors))
    else:
        reason = "disabled by config" if not want_net else "not root"
    return 0, {"network": f"not isolated ({reason})", "namespaces": "none"}


def loopback_only() -> bool:
    """True when the only network interface visible is the loopback one."""
    import socket

    return [name for _, name in socket.if_nameindex()] == ["lo"]


def _jail_sources() -> list[str]:
    """Host directories the jail needs read-only: the Python installation and the system libraries."""
    wanted = [p for p in sys.path if p and os.path.isdir(p)]
    wanted += [sys.prefix, sys.base_prefix, "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib"]
    real = sorted({os.path.realpath(p) for p in wanted if os.path.isdir(p)})
    kept: list[str] = []
    for path in real:  # drop paths already covered by a bound ancestor
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def build_jail(root: str, size_mb: int) -> list[str]:
    """Turn ``root`` into a chroot jail and chroot into it; return the read-only paths bound.

    Needs a private mount namespace and root.  ``root`` gets a tmpfs of ``size_mb`` (so sandbox
    writes land in memory, bounded, and vanish with the namespace), the Python installation and
    system libraries bound read-only (lazy imports keep working), ``/dev/null``, and ``/work``
    for the per-action working directories.  /etc, /proc, /home, the project and the rest of the
    host file system do not exist inside.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode=755")
    sources = _jail_sources()
    for src in sources:
        dst = root + src
        os.makedirs(dst, exist_ok=True)
        _mount(src, dst, None, MS_BIND | MS_REC)
        _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for link in ("/lib", "/lib64", "/bin"):  # merged-/usr systems: keep the symlinks the loader expects
        if os.path.islink(link) and not os.path.lexists(root + link):
            os.symlink(os.readlink(link), root + link)
    os.makedirs(root + "/dev", exist_ok=True)
    open(root + "/dev/null", "w").close()
    _mount("/dev/null", root + "/dev/null", None, MS_BIND)
    os.makedirs(root + "/work", mode=0o711, exist_ok=True)
    os.chmod(root + "/work", 0o711)
    os.chroot(root)
    os.chdir("/")
    return sources


def drop_privileges(uid: int = NOBODY) -> None:
    """Become ``uid`` (group and supplementary groups too); after this no capability is left."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def apply_rlimits(*, cpu_time_s: int, memory_mb: int, file_size_mb: int) -> None:
    """Kernel limits for one action: CPU time (SIGXCPU, then SIGKILL one second later), address
    space, size of any written file, open files, no new processes and no core dumps."""
    mib = 1 << 20
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_time_s, cpu_time_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb * mib, memory_mb * mib))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_mb * mib, file_size_mb * mib))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # NPROC counts every process of the user: 0 forbids fork for any non-root user.  (Root ignores
    # it, which is one reason the action drops to nobody first.)
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def confine_action_process(work_dir: str, drop_uid: bool, cfg: dict, keep_fd: int) -> None:
    """Confine a freshly forked action process (before any untrusted input is touched): only
    ``keep_fd`` stays open, the working directory is ``work_dir``, then uid nobody (if
    ``drop_uid``), no_new_privs, death with the parent and the rlimits of ``cfg``."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the zygote's pipes to the host must not be reachable from the action
        os.dup2(devnull, fd)
    os.closerange(3, keep_fd)
    os.closerange(max(keep_fd + 1, 3), os.sysconf("SC_OPEN_MAX"))
    os.chdir(work_dir)
    if drop_uid:
        drop_privileges()
    set_no_new_privs()
    set_parent_death_signal(signal.SIGKILL)  # after the uid change, which clears it
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead
    apply_rlimits(cpu_time_s=cfg["cpu_time_s"], memory_mb=cfg["memory_mb"], file_size_mb=cfg["file_size_mb"])


def address_space_mb() -> float:
    """Current virtual memory size of this process (what RLIMIT_AS counts), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) / 1024
    return 0.0

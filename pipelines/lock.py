"""One run at a time per output_dir. A local folder is locked with `flock` on `<output_dir>/.lock`: the kernel
releases it when the process ends, however it ends. Object storage has no locks: a lease object
(`.lock.json`: owner, host, pid, command, expiry) is renewed while the run lives and may be taken over once it
has expired, so a crashed run blocks the folder for one lease at most."""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

from actors.common.errors import InputError
from pipelines.layout import RunLayout

LEASE_S = 120.0        # an object-storage lease lasts this long unless renewed (every third of it)
POLL_S = 2.0           # how often a waiting run looks again
PROBE_RETRIES = 4      # quick retries before a folder counts as busy (a status probe may hold it briefly)


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["synthalign", *sys.argv[1:]])[:300]}


def _busy(root, holder: dict) -> InputError:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}"
    return InputError(f"is in use by another run ({who}: {holder.get('command', '?')}); wait for it, use another "
                      "output_dir, or pass --wait-for-lock", file=root.uri)


class RunLock:
    """`with RunLock(root, wait=False):` holds the folder for the block; raises InputError when another run
    holds it (or waits, with wait=True)."""

    def __init__(self, root, wait: bool = False, lease_s: float = LEASE_S):
        self.layout, self.wait, self.lease_s = RunLayout(root), wait, lease_s
        self.root = self.layout.root
        self.owner, self._fd, self._stop = uuid.uuid4().hex, None, threading.Event()

    def __enter__(self) -> RunLock:
        try:
            self._remote_acquire() if self.root.remote else self._local_acquire()
        except OSError as e:
            raise InputError(f"output folder is not writable ({getattr(e, 'strerror', None) or e})",
                             file=self.root.uri) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.root.remote:
            self._stop.set()
            lease = self._read_lease()
            if lease and lease.get("owner") == self.owner:
                self.layout.lease_path.unlink()
        elif self._fd is not None:
            import fcntl
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            # A run that failed before writing anything leaves no folder behind (bad input writes nothing).
            if self._created and exc[0] is not None and [p.name for p in self.root.glob("*")] == [".lock"]:
                self.layout.lock_path.unlink()
                os.rmdir(self.root.path)

    # ---- a local folder ------------------------------------------------------------------------------------
    def _local_acquire(self) -> None:
        import fcntl
        self._created = not self.root.exists()
        self.root.mkdir()
        fd = os.open(self.layout.lock_path.path, os.O_RDWR | os.O_CREAT, 0o644)
        probes = PROBE_RETRIES   # `is_held` holds a shared lock for microseconds: not a run, try again
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if probes > 0 and not self.wait:
                    probes -= 1
                    time.sleep(0.05)
                    continue
                if not self.wait:
                    holder = _parse(os.pread(fd, 4096, 0))
                    os.close(fd)
                    raise _busy(self.root, holder) from None
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self._fd = fd

    # ---- object storage ------------------------------------------------------------------------------------
    def _read_lease(self) -> dict | None:
        path = self.layout.lease_path
        return _parse(path.read_bytes()) if path.exists() else None

    def _remote_acquire(self) -> None:
        while True:
            lease = self._read_lease()
            if not lease or lease.get("expires", 0) < time.time():
                self._write_lease()
                time.sleep(0.5)   # two runs that wrote at once: the later write wins, the other sees it
                if (self._read_lease() or {}).get("owner") == self.owner:
                    break
                continue
            if not self.wait:
                raise _busy(self.root, lease)
            time.sleep(POLL_S)
        threading.Thread(target=self._renew, daemon=True).start()

    def _write_lease(self) -> None:
        lease = {**_holder(), "owner": self.owner, "expires": time.time() + self.lease_s}
        self.layout.lease_path.write_text(json.dumps(lease))

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self._write_lease()
            except OSError:
                pass   # a missed renewal only shortens the lease


def is_held(root) -> bool:
    """Whether a live run holds the folder: its flock (locally) or an unexpired lease (object storage). A round
    folder (`<run>/rounds/<n>`) is held by the run holding `<run>`."""
    layout = RunLayout(root)
    found = layout.round_of()
    if found and is_held(found[0].root.uri):
        return True
    if layout.root.remote:
        lease = _parse(layout.lease_path.read_bytes()) if layout.lease_path.exists() else {}
        return lease.get("expires", 0) >= time.time()
    import fcntl
    try:
        fd = os.open(layout.lock_path.path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:   # a shared lock is refused while a run holds its exclusive one; taken, it is released at once
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _parse(data: bytes) -> dict:
    try:
        return json.loads(data.decode("utf-8") or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}

"""Where a run's files live: a local folder or an object-storage URI (`s3://`, `gs://`, `abfs://`), both through
pyarrow's filesystems, the ones Ray Data and Ray Train use. Endpoints and credentials come from the standard
variables pyarrow reads (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), so MinIO or any S3-compatible store works.

`Location` is a path on such a filesystem with the few pathlib verbs a run needs. A write is whole or absent:
locally a file is written beside and renamed into place; an object store publishes an object only when its
upload completes, and we upload from memory so a failed write leaves nothing behind.
"""
from __future__ import annotations

import errno
import fnmatch
import os
from contextlib import contextmanager
from pathlib import Path

REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")


def is_uri(path: str | os.PathLike) -> bool:
    s = str(path)
    return "://" in s and s.split("://", 1)[0].lower() in REMOTE_SCHEMES


class Location:
    """A file or folder: `uri` is what users see (the path as given, or the URI); `fs`/`path` what pyarrow takes."""

    def __init__(self, where: str | os.PathLike | Location):
        if isinstance(where, Location):
            self.uri, self.fs, self.path = where.uri, where.fs, where.path
            return
        import pyarrow.fs as pafs
        where = str(where)
        if is_uri(where):
            self.uri = where.rstrip("/")
            self.fs, self.path = pafs.FileSystem.from_uri(self.uri)
        else:
            self.uri = where
            self.fs, self.path = pafs.LocalFileSystem(), str(Path(where).expanduser().absolute())

    @classmethod
    def _child(cls, parent: Location, uri: str, path: str) -> Location:
        loc = cls.__new__(cls)
        loc.uri, loc.fs, loc.path = uri, parent.fs, path
        return loc

    # ---- names ---------------------------------------------------------------------------------------------
    def __truediv__(self, name: str) -> Location:
        name = str(name).strip("/")
        uri = f"{self.uri}/{name}" if self.remote else str(Path(self.uri) / name)
        return Location._child(self, uri, f"{self.path.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """Local only: open(), Path() and pyarrow take a local Location as they take a path."""
        if self.remote:
            raise TypeError(f"{self.uri} is on object storage, not a local path")
        return self.path

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and (self.fs.type_name, self.path) == (other.fs.type_name, other.path)

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def remote(self) -> bool:
        return self.fs.type_name != "local"

    @property
    def local(self) -> Path | None:
        """The local path, or None on object storage."""
        return None if self.remote else Path(self.path)

    def relative_to(self, base: Location) -> str:
        return self.path[len(base.path.rstrip("/")) + 1:]

    # ---- what is there -------------------------------------------------------------------------------------
    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        import pyarrow.fs as pafs
        return self._info().type == pafs.FileType.File

    def mtime(self) -> float:
        return self._info().mtime.timestamp()

    def glob(self, pattern: str = "*") -> list[Location]:
        """Entries of this folder whose names match `pattern` (one level), sorted by name; none if absent."""
        import pyarrow.fs as pafs
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = sorted(i.base_name for i in infos if fnmatch.fnmatchcase(i.base_name, pattern))
        return [self / n for n in names]

    # ---- reading and writing -------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> Location:
        """Whole or absent (see the module's docstring)."""
        if self.remote:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return self
        from actors.common.files import atomic_write
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with naming(self):
            atomic_write(self.path, bytes(data))
        return self

    def write_text(self, text: str) -> Location:
        return self.write_bytes(text.encode("utf-8"))

    def append_text(self, text: str) -> None:
        """Append (an object store rewrites the object: for small logs such as metrics lines)."""
        if self.remote:
            self.write_text((self.read_text() if self.exists() else "") + text)
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)

    def mkdir(self) -> Location:
        if not self.remote:   # an object store has no folders to make
            self.fs.create_dir(self.path, recursive=True)
        return self

    def unlink(self) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    def rmtree(self) -> None:
        """This folder and everything under it, or this file; nothing when absent."""
        info = self._info()
        import pyarrow.fs as pafs
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.unlink()

    def replace(self, target: Location) -> None:
        """Move this file onto `target` (a rename locally; copy then delete on an object store)."""
        self.fs.move(self.path, target.path)

    @property
    def parent(self) -> Location:
        uri = self.uri.rstrip("/").rsplit("/", 1)[0] if self.remote else str(Path(self.uri).parent)
        return Location._child(self, uri, self.path.rstrip("/").rsplit("/", 1)[0])


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)   # a full disk, or a quota


class NoSpace(OSError):
    """A write that found no space (ENOSPC, or EDQUOT: a quota), naming its file. It pickles whole: a write task's
    error reaches the driver through Ray, and Ray Data appends to an exception's args on the way."""

    def __reduce__(self):
        return type(self), (self.errno, self.strerror, self.filename)


@contextmanager
def naming(loc: Location):
    """An OSError of a local write names the file (pyarrow's and a plain write's name none), so that the one
    line a full disk ends a run with can say where."""
    try:
        yield
    except OSError as e:
        if e.errno in NO_SPACE:
            raise NoSpace(e.errno, os.strerror(e.errno), e.filename or loc.uri) from e
        if e.filename is None and e.errno:
            raise OSError(e.errno, os.strerror(e.errno), loc.uri) from e
        raise


def read_table(loc: Location, columns=None):
    """A Parquet file; `columns` that the file lacks are left out."""
    import pyarrow.parquet as pq
    if columns is not None:
        names = pq.read_schema(loc.path, filesystem=loc.fs).names
        columns = [c for c in columns if c in names]
    return pq.read_table(loc.path, columns=columns, filesystem=loc.fs)


def read_schema(loc: Location):
    import pyarrow.parquet as pq
    return pq.read_schema(loc.path, filesystem=loc.fs)


def write_table(table, loc: Location) -> Location:
    """A Parquet file, whole or absent: locally written beside and renamed; remotely serialised in memory, then
    uploaded in one go."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if not loc.remote:
        from actors.common.files import atomic_file
        Path(loc.path).parent.mkdir(parents=True, exist_ok=True)
        with naming(loc), atomic_file(loc.path) as tmp:   # a failed write removes its temporary file
            pq.write_table(table, tmp)
        return loc
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return loc.write_bytes(sink.getvalue())


def check_everywhere(loc: Location, timeout: float = 120.0) -> None:
    """A local folder that tasks on several nodes write must be one folder on all of them (a mount they share):
    a task pinned to each alive node reads a probe the driver wrote and writes a reply the driver must see.
    Object storage needs no check. Raises InputError naming the first node that does not see it."""
    if loc.remote:
        return
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.common.errors import InputError
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex[:12]
    probe = loc.mkdir() / f".probe-{token}"
    probe.write_text(token)

    @ray.remote(num_cpus=0, max_retries=0)
    def answer(path: str, node: str) -> bool:
        try:
            if Path(path).read_text() != token:
                return False
            Path(f"{path}-{node}").write_text(token)
            return True
        except OSError:
            return False
    try:
        seen = ray.get([answer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(probe.path, n["NodeID"]) for n in nodes], timeout=timeout)
        for node, ok in zip(nodes, seen):
            if not (ok and (loc / f"{probe.name}-{node['NodeID']}").exists()):
                raise InputError(
                    f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]}) does not see this local folder: on "
                    "nodes with disks of their own, write to object storage (output_dir: s3://bucket/run) or to a "
                    "mount every node shares", file=loc.uri)
    finally:
        for f in loc.glob(f"{probe.name}*"):
            f.unlink()


def local_folder(where: str, dest: str | os.PathLike) -> str:
    """A folder to load with `from_pretrained`: a local path as it is; a URI copied to `dest` first."""
    if not is_uri(where):
        return where
    import pyarrow.fs as pafs
    src = Location(where)
    Path(dest).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src.path, str(dest), source_filesystem=src.fs, destination_filesystem=pafs.LocalFileSystem())
    return str(dest)

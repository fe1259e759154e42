"""Model and file I/O: reading models, and every write the tool makes.

Why this module exists: the tool's promise is that it never loses the user's data. Every
file the run reads (the model, its external-data files, calibration and eval data) is
registered, and every file it writes goes through one guard (:func:`check_output_path`) that
refuses an output resolving, by real path or by inode, to any of them, or naming an existing
file that is not a regular file (a device node, a FIFO). Writes are staged into temporary
files beside their target and renamed in only once every output is complete
(:func:`commit_all`), so a failed write, a full disk or an interrupt leaves no output behind
and "exit status 1" really means "no output file". Outputs get the mode the umask asks for
(0644 under umask 022), not the 0600 of a bare ``mkstemp``.

Temporary files carry the writer's process id (``.NAME.onnxlr-PID.XXXX.tmp``) so that a run
into a folder can remove what an earlier, killed run left there without touching the
temporary file of a run still in progress.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import onnx
from google.protobuf.message import DecodeError

from .errors import InputError, UnsupportedModelError
from .graph import default_opset

log = logging.getLogger(__name__)

#: Oldest default-domain opset we accept: onnxruntime itself supports opset 7 and newer.
MIN_OPSET = 7
#: Above this size a model is written with its weights in ``<name>.data`` (protobuf's 2 GB cap).
_PROTO_LIMIT = 1_800_000_000
#: Marker in the names of our temporary files; the process id follows it.
_TMP_TAG = ".onnxlr-"
#: chunk size of the unchanged copy (bounded memory whatever the model's size)
_COPY_CHUNK = 8 << 20
_TMP_RE = re.compile(r"^\..+\.onnxlr-(\d+)\..+\.(tmp|d)$")

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


def read_input_bytes(path: PathLike) -> bytes:
    """Read a model file once, as bytes; works on pipes (``/dev/stdin``, ``<(cat m.onnx)``)."""
    return _read_input(Path(path))[0]


#: what identifies one state of a regular file: device, inode, size, modification time (ns)
Fingerprint = tuple[int, int, int, int]


def _fingerprint(st: os.stat_result) -> Fingerprint:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _rereadable(p: Path, st: os.stat_result) -> bool:
    """A regular file that can be opened again for the same bytes (not a pipe, not /proc or /dev)."""
    real = os.path.realpath(p)
    return stat.S_ISREG(st.st_mode) and not real.startswith(("/proc/", "/dev/"))


def _read_input(p: Path) -> tuple[bytes, Fingerprint | None]:
    """The file's bytes, and its fingerprint when it is a regular file that can be read again."""
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an ONNX file")
    try:
        with open(p, "rb") as fh:
            before = os.fstat(fh.fileno())
            data = fh.read()
            st = os.fstat(fh.fileno())
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if not _rereadable(p, st):
        return data, None
    if _fingerprint(before) != _fingerprint(st) or len(data) != st.st_size:
        raise InputError(f"{p}: the file changed while it was being read; run again")
    return data, _fingerprint(st)


class InputCopy:
    """The input model file, to be copied byte for byte into the output (the unchanged copy).

    Why not keep the bytes read at the start: for VGG-19 they are 575 MB held for the whole
    run, only to be written back at the end. A regular file is copied from disk instead, in
    chunks; its fingerprint (device, inode, size, mtime) must be the one it had when it was
    read, before and after the copy, so the copy holds exactly the bytes the run read (a file
    changed in between is an error, never a silently different copy).
    """

    def __init__(self, path: Path, fingerprint: Fingerprint) -> None:
        self.path = path
        self.fingerprint = fingerprint


def external_data_files(model: onnx.ModelProto, base_dir: PathLike) -> list[Path]:
    """Files the model's external-data tensors point to (resolved against ``base_dir``).

    Collected before the data is loaded (loading clears the references), so that the write
    guard knows them: writing the output over a weights file would destroy the input model.
    """
    files: list[Path] = []
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value:
                files.append(Path(base_dir) / entry.value)
    return list(dict.fromkeys(files))


class LoadedModel:
    """A model read from a path, the means to copy it unchanged, and every file it was read from."""

    def __init__(self, model: onnx.ModelProto, data: bytes | None, sources: list[Path],
                 copy_from: InputCopy | None = None) -> None:
        self.model = model
        #: the bytes of the model file as read, kept only when the file cannot be read again
        #: (a pipe); None for a regular file, which :meth:`unchanged` copies from disk
        self.data = data
        #: the model file and its external-data files: the write guard refuses all of them
        self.sources = sources
        self._copy_from = copy_from

    def unchanged(self) -> bytes | InputCopy:
        """What the unchanged copy is written from: the kept bytes, or the file itself."""
        if self.data is not None:
            return self.data
        assert self._copy_from is not None
        return self._copy_from


def open_model(path: PathLike, *, data: bytes | None = None) -> LoadedModel:
    """Read and validate an ONNX file, turning every failure into a one-line InputError.

    ``data``, when given, is the file's content already read (from a pipe, say). External data
    next to the file is loaded too (weights must be in memory to be decomposed); onnx refuses
    locations outside the model's folder, symlinks and the like, and any such refusal is an
    InputError. The checker runs without full shape checking: exported models in the wild
    often carry slightly inconsistent value_info that the runtime tolerates.

    The bytes of a regular file are dropped once parsed (before the checker serializes the
    model once more): the unchanged copy is made from the file (:class:`InputCopy`). Only
    bytes that cannot be read again (a pipe, or ``data`` given by the caller) are kept.
    """
    p = Path(path)
    fingerprint: Fingerprint | None = None
    if data is None:
        data, fingerprint = _read_input(p)
    if not data:
        raise InputError(f"{p}: file is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        raise InputError(f"{p}: not an ONNX model (protobuf parse failed; truncated or wrong file?)") from None
    kept = data if fingerprint is None else None
    del data  # a regular file's bytes are not needed any more: free them before the checker
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise InputError(f"{p}: not an ONNX model (no graph found)")
    if not model.opset_import:
        raise InputError(f"{p}: ONNX model has no opset_import")
    check_supported(model, str(p))
    sources = [p, *external_data_files(model, p.parent)]
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    except Exception as exc:  # onnx raises OSError, ValueError and its own ValidationError here
        raise InputError(f"{p}: external data could not be loaded ({_first_line(exc)})") from None
    _check_model(model, p)
    return LoadedModel(model, kept, sources, None if fingerprint is None else InputCopy(p, fingerprint))


def _check_model(model: onnx.ModelProto, p: Path) -> None:
    """onnx.checker, except for its demand that graph inputs/outputs declare a shape.

    onnxruntime runs models whose outputs have no declared shape (rank unknown), and
    exporters write them; the checker refuses them ("Field 'shape' of 'type' is required").
    The missing shape fields are set for the duration of the check only.
    """
    filled = [vi for vi in list(model.graph.input) + list(model.graph.output)
              if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape")]
    for vi in filled:
        vi.type.tensor_type.shape.SetInParent()
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:  # ValidationError, and on odd protos other checker errors
        raise InputError(f"{p}: not a valid ONNX model ({_first_line(exc) or 'invalid model'})") from None
    finally:
        for vi in filled:
            vi.type.tensor_type.ClearField("shape")


def load_model(path: PathLike) -> onnx.ModelProto:
    """Read and validate an ONNX file (see :func:`open_model`)."""
    return open_model(path).model


def check_supported(model: onnx.ModelProto, where: str = "model") -> None:
    """Refuse models whose opset the runtime cannot run, with a clear reason."""
    op = default_opset(model)
    if op and op < MIN_OPSET:
        raise UnsupportedModelError(
            f"{where}: opset {op} is older than {MIN_OPSET}, which onnxruntime cannot run; "
            "convert it first with onnx.version_converter"
        )
    newest = onnx.defs.onnx_opset_version()
    if op > newest:
        raise UnsupportedModelError(
            f"{where}: opset {op} is newer than this onnx package understands ({newest}); upgrade onnx"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# --------------------------------------------------------------------------------------
# the write-path guard
# --------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    """True when two paths name one file: same real path, or same inode (hard links)."""
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
    except (OSError, ValueError):
        pass
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        real, root = os.path.realpath(path), os.path.realpath(folder)
    except (OSError, ValueError):
        return False
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def check_output_path(path: PathLike, input_path: PathLike | None = None, *,
                      reads: Iterable[PathLike] = (), what: str = "output") -> Path:
    """Refuse, before any work and again before writing, an output that would destroy data.

    Refused: the input model or any other file the run reads (``reads``: external-data files,
    calibration and eval data; for a data folder, anything inside it), compared by real path
    and by inode; an existing directory; an existing file that is not a regular file (a device
    node or FIFO would be replaced by a regular file); a missing or read-only folder.
    """
    out = Path(path)
    label = f"{out}: {what} path"
    read_paths = [Path(r) for r in ([input_path] if input_path is not None else []) + list(reads)]
    for r in read_paths:
        if _same_file(out, r):
            which = "the input model" if input_path is not None and r == Path(input_path) else f"{r}, which this run reads"
            raise InputError(f"{label} is {which}; choose another path (inputs are never overwritten)")
        if r.is_dir() and _inside(out, r):
            raise InputError(f"{label} is inside the data folder {r}, which this run reads; choose another path")
    if out.is_dir():
        raise InputError(f"{label} is a directory")
    if os.path.lexists(out):
        try:
            st = os.stat(out)
        except OSError:
            st = None  # a dangling symlink: the rename replaces the link itself
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise InputError(f"{label} exists and is not a regular file (device, FIFO or socket); "
                             "it is never replaced: choose another path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{out}: {what} folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{out}: {what} folder {parent} is not writable")
    return out


def check_distinct(paths: Sequence[tuple[str, PathLike]]) -> None:
    """Two outputs of one run (``-o`` and ``--report``, say) must not name the same file."""
    for i, (flag_a, a) in enumerate(paths):
        for flag_b, b in paths[i + 1:]:
            if _same_file(Path(a), Path(b)) or os.path.abspath(a) == os.path.abspath(b):
                raise InputError(f"{b}: {flag_b} and {flag_a} name the same file")


# --------------------------------------------------------------------------------------
# modes and stale temporaries
# --------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other way to read it; restored at once
    os.umask(mask)
    return mask


def default_mode() -> int:
    """Mode a new file gets from ``open()``: 0666 minus the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def mode_of(path: PathLike) -> int | None:
    """Permission bits of a regular file, or None (pipes and devices: use the umask default)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's process: leave its files alone
    return True


def clean_stale_temps(folder: PathLike) -> list[Path]:
    """Remove temporary files of our own naming whose writing process no longer exists.

    A SIGKILL between writing a temporary file and renaming it leaves a full-size hidden
    file; the next run into the same folder removes it. Files of live processes, and any
    file not named by this module, are never touched.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
            log.info("removed stale temporary file %s left by an interrupted run", entry.path)
        except OSError:
            pass
    return removed


# --------------------------------------------------------------------------------------
# staged writes
# --------------------------------------------------------------------------------------


class Staged:
    """One output fully written to temporary files beside its target, not yet renamed in.

    ``moves`` are (temporary, final) pairs renamed in order by :meth:`commit`; ``cleanup``
    is removed afterwards whatever happens.
    """

    def __init__(self, final: Path, moves: list[tuple[str, Path]], cleanup: str | None = None) -> None:
        self.final = final
        self.moves = moves
        self.cleanup = cleanup
        self.done: list[Path] = []

    def commit(self) -> None:
        try:
            for tmp, final in self.moves:
                os.replace(tmp, final)
                self.done.append(final)
        except OSError as exc:
            self.undo()
            raise InputError(f"{self.final}: cannot write ({exc.strerror or exc})") from None
        finally:
            self.discard()

    def undo(self) -> None:
        """Remove what :meth:`commit` renamed in (a later output failed: leave no output)."""
        for final in self.done:
            try:
                os.unlink(final)
            except OSError:
                pass
        self.done = []

    def discard(self) -> None:
        """Remove temporary files not (or no longer) needed."""
        for tmp, _final in self.moves:
            if os.path.lexists(tmp):
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        if self.cleanup is not None:
            shutil.rmtree(self.cleanup, ignore_errors=True)


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}{_TMP_TAG}{os.getpid()}."


def stage_bytes(path: PathLike, data: bytes, *, mode: int | None = None) -> Staged:
    """Write ``data`` to a temporary file beside ``path`` (fsynced, with the final mode)."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    clean_stale_temps(parent)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(out), suffix=".tmp", dir=parent)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), default_mode() if mode is None else mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        staged = Staged(out, [(tmp, out)])
        tmp = None
        return staged
    except OSError as exc:
        raise InputError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def stage_copy(path: PathLike, source: InputCopy, *, mode: int | None = None) -> Staged:
    """Copy the input file, in chunks, to a temporary file beside ``path`` (fsynced, final mode).

    The source must still be the file the run read: same device, inode, size and modification
    time before and after the copy; otherwise nothing is staged and the run fails (exit 1)
    rather than write a copy of something else.
    """
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    clean_stale_temps(parent)
    changed = InputError(f"{source.path}: the input model changed on disk during the run; "
                         "no unchanged copy written (run again)")
    tmp: str | None = None
    try:
        with open(source.path, "rb") as src:
            if _fingerprint(os.fstat(src.fileno())) != source.fingerprint:
                raise changed
            fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(out), suffix=".tmp", dir=parent)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), default_mode() if mode is None else mode)
                shutil.copyfileobj(src, fh, _COPY_CHUNK)
                fh.flush()
                os.fsync(fh.fileno())
            if _fingerprint(os.fstat(src.fileno())) != source.fingerprint or os.path.getsize(tmp) != source.fingerprint[2]:
                raise changed
        staged = Staged(out, [(tmp, out)])
        tmp = None
        return staged
    except OSError as exc:
        if not source.path.exists():
            raise InputError(f"{source.path}: the input model was removed during the run; "
                             "no unchanged copy written") from None
        raise InputError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def stage_model(model: onnx.ModelProto, path: PathLike, *, mode: int | None = None) -> Staged:
    """Serialize a model to temporary file(s) beside ``path``.

    Models past protobuf's 2 GB limit are written with their weights in ``<name>.data``: both
    files are produced in a temporary folder beside the target and moved in, data first.
    """
    out = Path(path)
    if model.ByteSize() <= _PROTO_LIMIT:
        return stage_bytes(out, model.SerializeToString(), mode=mode)
    parent = out.parent if str(out.parent) else Path(".")
    clean_stale_temps(parent)
    data_name = out.name + ".data"
    tmpdir: str | None = None
    try:
        tmpdir = tempfile.mkdtemp(prefix=_tmp_prefix(out), suffix=".d", dir=parent)
        onnx.save_model(copy.deepcopy(model), os.path.join(tmpdir, out.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        for name in (out.name, data_name):
            os.chmod(os.path.join(tmpdir, name), default_mode() if mode is None else mode)
        staged = Staged(out, [(os.path.join(tmpdir, data_name), parent / data_name),
                              (os.path.join(tmpdir, out.name), out)], cleanup=tmpdir)
        tmpdir = None
        return staged
    except OSError as exc:
        raise InputError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def commit_all(staged: Sequence[Staged]) -> None:
    """Rename every staged output in, in order; if one fails, remove those already renamed.

    Staging (the part that can run out of disk) is over before the first rename, so in
    practice either every output appears or none does.
    """
    done: list[Staged] = []
    try:
        for s in staged:
            s.commit()
            done.append(s)
    except BaseException:
        for s in done:
            s.undo()
        for s in staged:
            s.discard()
        raise


def write_atomic(path: PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Write bytes atomically: a temporary file in the target folder, fsync, rename.

    A crash, a full disk or a refused write never leaves a half-written file under the final
    name, nor a temporary file behind; every OS error becomes a one-line InputError. The file
    gets ``mode``, by default what the umask gives a new file.
    """
    stage_bytes(path, data, mode=mode).commit()


def save_model(model: onnx.ModelProto, path: PathLike, *, input_path: PathLike | None = None,
               reads: Iterable[PathLike] = ()) -> None:
    """Write a model atomically; the input and every file in ``reads`` are never overwritten."""
    out = check_output_path(path, input_path, reads=reads)
    if model.ByteSize() > _PROTO_LIMIT:
        check_output_path(out.parent / (out.name + ".data"), input_path, reads=reads, what="weights")
    stage_model(model, out).commit()


def write_outputs(outputs: Sequence[tuple[PathLike, bytes | onnx.ModelProto | InputCopy, int | None]], *,
                  input_path: PathLike | None = None, reads: Iterable[PathLike] = ()) -> None:
    """Write several outputs (model, report, ...) so that either all appear or none does.

    Every path (and the ``.data`` weights file of a model past 2 GB) first passes the write
    guard against ``input_path`` and ``reads``, and the outputs must differ from each other.
    Each is then staged completely (a full disk fails here, before any rename); only then are
    they renamed in, in the order given. ``(path, content, mode)``: content is bytes, a
    model, or the input file to copy unchanged (:class:`InputCopy`); mode None means what the
    umask gives.
    """
    reads = list(reads)
    targets: list[tuple[str, PathLike]] = []
    for path, content, _mode in outputs:
        check_output_path(path, input_path, reads=reads)
        targets.append((str(path), path))
        if isinstance(content, onnx.ModelProto) and content.ByteSize() > _PROTO_LIMIT:
            side = Path(path).parent / (Path(path).name + ".data")
            check_output_path(side, input_path, reads=reads, what="weights")
            targets.append((str(side), side))
    check_distinct(targets)
    staged: list[Staged] = []
    try:
        for path, content, mode in outputs:
            if isinstance(content, onnx.ModelProto):
                staged.append(stage_model(content, path, mode=mode))
            elif isinstance(content, InputCopy):
                staged.append(stage_copy(path, content, mode=mode))
            else:
                staged.append(stage_bytes(path, content, mode=mode))
    except BaseException:
        for s in staged:
            s.discard()
        raise
    commit_all(staged)

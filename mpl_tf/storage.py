"""Paths and files on any file system TensorFlow reads: local, gs://, ram://.

Every file mpl_tf reads or writes goes through tf.io.gfile or TF ops, so a
data set, a run or an export can live on Cloud Storage as well as on a local
disk. This module holds the few helpers that need more than one gfile call:

* A path with a scheme (`gs://b/x`, `ram://x`) is never made absolute:
  `os.path.abspath` would turn `gs://b/x` into `$PWD/gs:/b/x`, a local
  folder. `absolute` expands `~` and the working directory of local paths
  only.
* Only a local file system renames a directory atomically. On Cloud Storage
  a directory "rename" copies each object and then deletes it, so a reader
  can see half of it; TF's `ram://` file system does not rename a directory
  at all (the files stay under the old name; the new one is empty).
  `replace_directory` therefore renames locally and, anywhere else, moves
  file by file with the completion marker (the file readers check for) last.
* GCS lists a sub-directory as `name/`; `listdir` and `walk` drop the slash,
  so names compare as on a local disk. TF's ram:// matches names by prefix:
  listing `d` also yields `.x` for a sibling `d.x` (a SavedModel's `assets`
  and `assets.extra`), and exists() and isdir() hold for any prefix of a
  name (`ckpt-3` when `ckpt-3.index` exists); `listdir` and `walk` drop
  such phantom entries, and `rmtree` deletes entry by entry there, as
  tf.io.gfile.rmtree fails on a phantom (after deleting the rest).
"""

import io
import json
import os
import posixpath
import re
import uuid
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from mpl_tf.config import ConfigError

_SCHEME = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')
# File systems whose listings include names that only extend a sibling's.
_PREFIX_MATCHING = ('ram://',)
# File systems in the memory of the process that writes them.
_IN_PROCESS = ('ram://',)


def has_scheme(path: str) -> bool:
  """Whether `path` names a file system by scheme (gs://, ram://, s3://)."""
  return bool(_SCHEME.match(path))


def absolute(path: str) -> str:
  """`~` expanded and made absolute, for local paths; others unchanged."""
  if has_scheme(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


# What TensorFlow reads without tensorflow-io: anything else (s3://, hdfs://,
# a typo) fails at its first file call with UnimplementedError.
_WORKING_SCHEMES = ('a local path', 'gs:// (Cloud Storage)',
                    'ram:// (in this process only)')


def check_reachable(path: str, flag: str) -> None:
  """Raises ConfigError unless TensorFlow can look at `path` (a --`flag`).

  A path with a scheme fails at its first file call when the scheme is not
  built into TensorFlow, or when its service cannot be reached (gs://
  without network or credentials): here that is one message naming the
  flag, the path and the likely cause, before anything is read or
  written, instead of the call's OpError wherever it happens first. One
  exists() call, which answers in milliseconds either way; local paths
  are not probed (their errors already name them).
  """
  if not has_scheme(path):
    return
  try:
    tf.io.gfile.exists(path)
  except tf.errors.UnimplementedError:
    scheme = path.split('://', 1)[0]
    raise ConfigError(
        f'--{flag}={path}: TensorFlow has no file system for {scheme}://. '
        f'It reads {", ".join(_WORKING_SCHEMES)}; copy the files to one of '
        f'those, or fix the path.') from None
  except tf.errors.OpError as error:
    cause = ' '.join((error.message or '').split())
    if path.startswith('gs://'):
      advice = ('check the network and the credentials (on a Cloud VM its '
                'service account; elsewhere `gcloud auth application-default '
                'login` or GOOGLE_APPLICATION_CREDENTIALS), and that the '
                'bucket exists')
    else:
      advice = 'check the network, the credentials and the path'
    raise ConfigError(f'--{flag}={path} cannot be reached ({cause}): '
                      f'{advice}.') from None


def outlives_process(path: str) -> bool:
  """Whether what is written at `path` is still there when the process ends.

  Not on TF's ram://, which lives in the writing process's memory: the
  library may use it (tests, in-process pipelines), but a command that
  writes its result there reports success and leaves nothing behind.
  """
  return not path.lower().startswith(_IN_PROCESS)


def check_outlives_process(path: str, flag: str) -> None:
  """ConfigError (a ValueError) naming `--flag` unless `path` outlives the
  command.

  For the command-line layer: a flag whose directory must still hold the
  result when the command has ended (a prepared data set, a run).
  """
  if not outlives_process(path):
    raise ConfigError(
        f'--{flag}={path} is on ram://, TensorFlow\'s in-memory file system, '
        f'which lives only as long as the process: whatever this command '
        f'writes there is gone when it ends, and a new command finds it '
        f'empty. Pass a local directory or a bucket path (gs://...) as '
        f'--{flag}.')


def renames_atomically(path: str) -> bool:
  """Whether a directory at `path` can be renamed into place in one step.

  Decided by scheme: local paths can; Cloud Storage copies object by object,
  and other remote or in-memory file systems promise nothing.
  """
  return not has_scheme(path)


def split(path: str) -> Tuple[str, str]:
  """(parent, name) of a path; a scheme's root stays whole ('ram://', 'x')."""
  match = _SCHEME.match(path)
  scheme = match.group(0) if match else ''
  rest = path[len(scheme):]
  module = posixpath if scheme else os.path
  parent, name = module.split(rest.rstrip('/') or rest)
  return scheme + parent, name


def hidden_sibling(path: str, kind: str) -> str:
  """A unique hidden name next to `path`, e.g. `.1.tmp-123-0a1b2c3d`.

  Hidden (TF Serving and glob patterns of numbered or named entries skip
  it), and not `path` plus a suffix, so no name starts with `path`'s name.
  """
  parent, name = split(path)
  return os.path.join(parent, f'.{name}.{kind}-{os.getpid()}-'
                              f'{uuid.uuid4().hex[:8]}')


def _running(pid: int) -> bool:
  """Whether process `pid` runs on this machine (signal 0 only probes)."""
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # another user's process
    return True
  return True


def interrupted_siblings(path: str, kinds: Sequence[str] = ('tmp', 'old')
                         ) -> List[Tuple[str, str]]:
  """(path, kind) of `path`'s hidden siblings that dead processes left.

  A process killed (SIGKILL, a crash, power loss) between hidden_sibling()
  and its own clean-up leaves the sibling behind. Only names exactly of
  hidden_sibling's form (`.<name>.<kind>-<pid>-<8 hex digits>`) are listed,
  so no file of a user's is taken for one; nor are those of a process still
  running on this machine (another run writing the same path).
  """
  parent, name = split(path)
  pattern = re.compile(rf'\.{re.escape(name)}\.'
                       rf'({"|".join(map(re.escape, kinds))})-(\d+)-'
                       rf'[0-9a-f]{{8}}')
  listed = parent or '.'
  if not tf.io.gfile.isdir(listed):
    return []
  found = []
  for entry in sorted(listdir(listed)):
    match = pattern.fullmatch(entry)
    if match and not _running(int(match.group(2))):
      found.append((os.path.join(parent, entry), match.group(1)))
  return found


def restore_replaced(final_dir: str) -> Optional[str]:
  """Puts back a directory a killed replace_directory() had moved aside.

  Killed between its two renames, replace_directory leaves `final_dir`
  missing and the previous directory, whole, in an `.old` sibling; it is
  renamed back (when there is exactly one). Returns the path it came from.
  """
  if tf.io.gfile.exists(final_dir):
    return None
  old = [path for path, _ in interrupted_siblings(final_dir, ('old',))]
  if len(old) != 1:
    return None
  tf.io.gfile.rename(old[0], final_dir)
  return old[0]


def remove_interrupted(final_dir: str) -> List[str]:
  """Deletes what killed writers of `final_dir` left next to it; the paths.

  A `.tmp` sibling is a directory never put in place. An `.old` sibling is
  deleted only once `final_dir` exists (it is then what a killed
  replace_directory had replaced; see restore_replaced otherwise).
  """
  removed = []
  for path, kind in interrupted_siblings(final_dir):
    if kind == 'tmp' or tf.io.gfile.exists(final_dir):
      rmtree(path)
      removed.append(path)
  return removed


def _strip_slash(path: str) -> str:
  """`path` without trailing '/' (GCS adds one to directories)."""
  stripped = path.rstrip('/')
  return path if not stripped or stripped.endswith(':') else stripped


def _existing(directory: str, names: List[str]) -> List[str]:
  """`names` listed in `directory` without the phantoms of ram:// listings.

  A phantom (`.extra` in `assets` for a sibling `assets.extra`) is no
  prefix of a stored name, so exists() is false for it even there.
  """
  if not directory.startswith(_PREFIX_MATCHING):
    return names
  return [name for name in names
          if tf.io.gfile.exists(os.path.join(directory, name))]


def listdir(path: str) -> List[str]:
  """The entries of a directory, named as on a local disk."""
  return _existing(path, [_strip_slash(name)
                          for name in tf.io.gfile.listdir(path)])


def walk(top: str) -> Iterator[Tuple[str, List[str], List[str]]]:
  """tf.io.gfile.walk (top-down), entries named as on a local disk."""
  for directory, subdirectories, files in tf.io.gfile.walk(top):
    directory = _strip_slash(directory)
    yield (directory, [_strip_slash(name) for name in subdirectories],
           _existing(directory, files))


def isfile(path: str) -> bool:
  """os.path.isfile for any file system (tf.io.gfile has none)."""
  return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)


def read_bytes(path: str) -> bytes:
  """A whole file, for readers that take bytes or a file object in memory."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    return f.read()


def load_npz(path: str):
  """np.load of an .npz on any file system (np.load opens local paths only).

  Returns the NpzFile (use it as a context manager); pickles are refused.
  """
  return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def list_files(root: str) -> Tuple[List[str], List[str]]:
  """(sub-directories, files) under `root`, relative to it, sorted."""
  root = _strip_slash(root)
  directories, files = [], []
  for directory, _, names in walk(root):
    relative = directory[len(root):].lstrip('/')
    if relative:
      directories.append(relative)
    files.extend(posixpath.join(relative, name) if relative else name
                 for name in names)
  return sorted(directories), sorted(files)


def rmtree(path: str) -> None:
  """Deletes a directory and everything in it (tf.io.gfile.rmtree).

  On ram:// entry by entry: files, then directories, longest names first,
  so `assets.extra` goes before `assets` and no phantom is met.
  """
  if not path.startswith(_PREFIX_MATCHING):
    tf.io.gfile.rmtree(path)
    return
  directories, files = list_files(path)
  for name in files:
    tf.io.gfile.remove(os.path.join(path, name))
  for name in sorted(directories, reverse=True):
    tf.io.gfile.rmtree(os.path.join(path, name))
  tf.io.gfile.rmtree(path)


def _replace_by_rename(new_dir: str, final_dir: str) -> None:
  """Each step one atomic rename: readers see the old or the new directory.

  (Or, for the instant between the two renames, none.)
  """
  if not tf.io.gfile.exists(final_dir):
    tf.io.gfile.rename(new_dir, final_dir)
    return
  old_dir = hidden_sibling(final_dir, 'old')
  tf.io.gfile.rename(final_dir, old_dir)
  try:
    tf.io.gfile.rename(new_dir, final_dir)
  except Exception:
    tf.io.gfile.rename(old_dir, final_dir)
    raise
  tf.io.gfile.rmtree(old_dir)


def _replace_file_by_file(new_dir: str, final_dir: str,
                          last: Sequence[str]) -> None:
  """Old markers go first, new files in order, the `last` ones last.

  A reader that trusts only a directory with its marker (`last[-1]`) never
  takes the old directory half deleted or the new one half moved.
  """
  if tf.io.gfile.exists(final_dir):
    for name in reversed(last):
      path = os.path.join(final_dir, name)
      if tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)
    rmtree(final_dir)
  directories, files = list_files(new_dir)
  tf.io.gfile.makedirs(final_dir)
  for directory in directories:
    tf.io.gfile.makedirs(os.path.join(final_dir, directory))
  ordered = [name for name in files if name not in last]
  ordered += [name for name in last if name in files]
  for name in ordered:
    tf.io.gfile.rename(os.path.join(new_dir, name),
                       os.path.join(final_dir, name), overwrite=True)
  rmtree(new_dir)


def replace_directory(new_dir: str, final_dir: str,
                      last: Sequence[str] = ()) -> None:
  """Puts the finished `new_dir` at `final_dir`, replacing what is there.

  Locally by atomic renames. Elsewhere file by file: the `last` files
  (paths relative to the directory; the completion marker at the end) are
  removed first from the old directory and moved last into the new one, so
  a reader that trusts only a directory holding the marker never takes a
  half-written one. `new_dir` must be a sibling of `final_dir` (same file
  system); it is gone afterwards.
  """
  if renames_atomically(final_dir):
    _replace_by_rename(new_dir, final_dir)
  else:
    _replace_file_by_file(new_dir, final_dir, last)


def write_json(path: str, payload: Any) -> None:
  """Writes JSON (sorted keys) to a temporary name, then renames it.

  A reader never sees half a file, and a killed write leaves the old one.
  The temporary name is the process's own (`<path>.tmp-<pid>`), so two
  processes writing the same file never write into one temporary file.
  Creates the directory first.
  """
  tf.io.gfile.makedirs(posixpath.dirname(path) if has_scheme(path) else
                       (os.path.dirname(path) or '.'))
  temporary_path = f'{path}.tmp-{os.getpid()}'
  with tf.io.gfile.GFile(temporary_path, 'w') as f:
    f.write(json.dumps(payload, indent=2, sort_keys=True))
  tf.io.gfile.rename(temporary_path, path, overwrite=True)


def read_json(path: str) -> Any:
  with tf.io.gfile.GFile(path) as f:
    return json.loads(f.read())

"""The layout rules of docs/architecture.md, checked on the source itself.

An AST walk of every module under mpl_tf/ (imports inside functions too):
the library never imports flags/ (or absl's flags), its modules import each
other without a circle, the step's modules know nothing of files, loops or
flags, and no module grows past the size the project keeps them under.
"""

import ast
import os
import unittest
from typing import Dict, Set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = os.path.join(REPO, 'mpl_tf')
MAX_LINES = 450
# The step and what it is built from: one batch in, both networks updated,
# scalars out. They may use TensorFlow, Keras, numpy and each other.
STEP_MODULES = ('mpl_tf.mpl_step', 'mpl_tf.teacher_pass', 'mpl_tf.uda_step',
                'mpl_tf.supervised_step', 'mpl_tf.losses', 'mpl_tf.health',
                'mpl_tf.ema', 'mpl_tf.optim', 'mpl_tf.row_noise',
                'mpl_tf.loss_scale', 'mpl_tf.microbatches')
# What the step's modules must not import: files, loops, flags, processes.
NOT_FOR_THE_STEP = ('os', 'shutil', 'glob', 'pathlib', 'subprocess', 'absl',
                    'flags', 'mpl_tf.storage', 'mpl_tf.train',
                    'mpl_tf.phase', 'mpl_tf.device_loop', 'mpl_tf.cluster',
                    'mpl_tf.data', 'mpl_tf.app', 'mpl_tf.checkpoints')


def _module_name(path: str) -> str:
  name = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
  return name[:-len('.__init__')] if name.endswith('.__init__') else name


def _library_files() -> Dict[str, str]:
  files = {}
  for directory, subdirectories, names in os.walk(LIBRARY):
    subdirectories[:] = [d for d in subdirectories if d != '__pycache__']
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        files[_module_name(path)] = path
  return files


def _imported_names(path: str) -> Set[str]:
  """Every dotted name the file imports, `from a import b` giving a.b
  (which resolves to module a when b is a name defined in it)."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def _library_imports(files: Dict[str, str]) -> Dict[str, Set[str]]:
  """module -> the library modules it imports (a name resolves to the
  longest module it names: `from mpl_tf import losses` -> mpl_tf.losses)."""
  graph = {}
  for module, path in files.items():
    targets = set()
    for name in _imported_names(path):
      while name and name not in files:
        name = name.rpartition('.')[0]
      # A package's own __init__ is imported by each submodule on the way;
      # the edge that counts is to the module named.
      if name and name != module and name != 'mpl_tf':
        targets.add(name)
    graph[module] = targets
  return graph


def _circle(graph: Dict[str, Set[str]]):
  """One import circle as a list of modules, or None (depth-first search)."""
  state, path = {}, []

  def visit(module):
    state[module] = 'open'
    path.append(module)
    for target in sorted(graph.get(module, ())):
      if state.get(target) == 'open':
        return path[path.index(target):] + [target]
      if target not in state:
        found = visit(target)
        if found:
          return found
    state[module] = 'done'
    path.pop()
    return None

  for module in sorted(graph):
    if module not in state:
      found = visit(module)
      if found:
        return found
  return None


class ArchitectureTest(unittest.TestCase):

  def setUp(self):
    self.files = _library_files()
    self.assertGreater(len(self.files), 40)   # the walk found the library

  def test_the_library_never_imports_flags(self):
    for module, path in self.files.items():
      for name in _imported_names(path):
        with self.subTest(module=module, imports=name):
          self.assertFalse(name == 'flags' or name.startswith('flags.'))
          self.assertNotIn(name, ('absl.flags', 'absl.app'))

  def test_no_import_circle(self):
    self.assertIsNone(_circle(_library_imports(self.files)))

  def test_the_step_knows_no_files_loops_or_flags(self):
    for module in STEP_MODULES:
      for name in _imported_names(self.files[module]):
        with self.subTest(module=module, imports=name):
          self.assertFalse(any(name == banned or name.startswith(banned + '.')
                               for banned in NOT_FOR_THE_STEP))

  def test_no_module_is_longer_than_the_limit(self):
    for module, path in self.files.items():
      with open(path, encoding='utf-8') as f:
        lines = sum(1 for _ in f)
      with self.subTest(module=module):
        self.assertLessEqual(lines, MAX_LINES)


if __name__ == '__main__':
  unittest.main()

"""The package's import graph, read from the source (imports inside functions included): no cycle
in ``mmorepa``, every import goes down the layers of :data:`LAYERS` (or stays within one), the
library never imports ``mmorepa.cli``, no tool imports another tool or a private name, and no one
sets mmengine's private ``Runner._has_loaded``. No function in the package or the tools is longer
than :data:`MAX_FUNCTION_LINES`."""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

from helpers import ROOT

PACKAGE = ROOT / 'mmorepa'
# The layers, lowest first, as prefixes of module names below ``mmorepa.``: a module may import
# modules of its own layer or a lower one. A prefix names a module or a package with all its
# modules (``ops`` holds ``mmorepa.ops.algebra``, ``mmorepa.ops.squeeze``, ...).
LAYERS = [
    ('errors', 'fileio', 'compat', '_squeeze_cpu'),  # exceptions, files, versions; C++ extension
    ('ops', ),  # the branch registry, the kernel algebra and the squeeze operator
    ('layers', ),  # re-parameterized convs
    ('fusion', 'checkpoint', 'official', 'config', 'datasets'),  # fusion, I/O
    ('models', ),  # backbones, built on the layers and fusion
    ('deploy', 'export', 'quantization', 'amp'),  # deployment, INT8, training engine
    ('', ),  # the package itself: ``import mmorepa`` registers everything
    ('cli', ),  # what the tools share; only tools import it
]
# Compiled modules inside the package (no Python source to read).
EXTENSIONS = {'mmorepa._squeeze_cpu'}
# A function fits a screen: its lines from ``def`` to its end, docstring included.
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def _library_modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _imports(path: Path, name: str, known: Set[str]) -> List[tuple]:
    """``(module, imported names)`` of every import in ``path`` (module ``name``), relative
    imports resolved; ``from pkg import sub`` counts as an import of ``pkg.sub`` where that is a
    module."""
    is_package = path.name == '__init__.py'
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = name.split('.')
                parts = parts[:len(parts) - node.level + (1 if is_package else 0)]
                base = '.'.join(parts + ([node.module] if node.module else []))
            names = tuple(a.name for a in node.names)
            subs = [f'{base}.{n}' for n in names if f'{base}.{n}' in known]
            found += [(s, ()) for s in subs]
            if len(subs) < len(names):
                found.append((base, tuple(n for n in names if f'{base}.{n}' not in known)))
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _library_modules()
    known = set(modules) | EXTENSIONS
    return {name: {m for m, _ in _imports(path, name, known)
                   if m == 'mmorepa' or m.startswith('mmorepa.')}
            for name, path in modules.items()}


def _layer(module: str) -> Optional[int]:
    if module == 'mmorepa':
        return next(i for i, prefixes in enumerate(LAYERS) if prefixes == ('', ))
    rest = module[len('mmorepa.'):]
    for i, prefixes in enumerate(LAYERS):
        if any(p and (rest == p or rest.startswith(p + '.')) for p in prefixes):
            return i
    return None


def _cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """A cycle of ``graph`` as a list of modules (the first repeated at the end), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 'done'
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_is_read():
    """The graph the tests below check is the package's: known edges are found."""
    graph = _graph()
    assert 'mmorepa.errors' in graph['mmorepa.checkpoint']
    assert 'mmorepa.checkpoint' in graph['mmorepa.deploy']
    assert 'mmorepa.deploy' in graph['mmorepa']  # ``from . import deploy`` in the package


def test_no_import_cycle():
    assert _cycle(_graph()) is None, ' -> '.join(_cycle(_graph()))


def test_the_cycle_finder_finds_one():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


def test_every_module_has_a_layer():
    graph = _graph()
    unplaced = sorted(m for m in set(graph).union(*graph.values()) if _layer(m) is None)
    assert not unplaced, f'add these modules to LAYERS: {unplaced}'


def test_imports_go_down_the_layers():
    graph = _graph()
    upward = [f'{m} (layer {_layer(m)}) imports {n} (layer {_layer(n)})'
              for m in sorted(graph) for n in sorted(graph[m])
              if None not in (_layer(m), _layer(n)) and _layer(n) > _layer(m)]
    assert not upward, '\n'.join(upward)


def test_the_library_never_imports_the_command_line():
    graph = _graph()
    assert [m for m in graph if 'mmorepa.cli' in graph[m] and m != 'mmorepa.cli'] == []


def _tool_files() -> List[Path]:
    return sorted((ROOT / 'tools').rglob('*.py'))


def test_tools_import_no_tool_and_no_private_name():
    """A tool imports the library's public names only, never another tool."""
    tools = {p.stem for p in _tool_files()}
    known = set(_library_modules()) | EXTENSIONS
    bad = []
    for path in _tool_files():
        for module, names in _imports(path, path.stem, known):
            if module.split('.')[0] in tools:
                bad.append(f'{path.relative_to(ROOT)} imports the tool {module}')
            if module.split('.')[0] != 'mmorepa':
                continue
            bad += [f'{path.relative_to(ROOT)} imports the private {module}.{n}'
                    for n in names if n.startswith('_')]
            if any(part.startswith('_') for part in module.split('.')):
                bad.append(f'{path.relative_to(ROOT)} imports the private module {module}')
    assert not bad, '\n'.join(bad)


@pytest.mark.parametrize('folder', ['mmorepa', 'tools'])
def test_no_one_sets_mmengines_private_has_loaded(folder):
    users = [str(p.relative_to(ROOT)) for p in sorted((ROOT / folder).rglob('*.py'))
             if '_has_loaded' in p.read_text()]
    assert users == []


def _long_functions(source: str, limit: int) -> List[str]:
    """``name (N lines)`` of each function in ``source`` longer than ``limit`` lines."""
    return [f'{node.name} ({node.end_lineno - node.lineno + 1} lines)'
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_the_long_function_finder_finds_one():
    body = '        x = 1\n' * 80
    source = f'def short():\n    pass\n\n\nclass A:\n    def long(self):\n{body}'
    assert _long_functions(source, 80) == ['long (81 lines)']
    assert _long_functions(source, 81) == []


@pytest.mark.parametrize('folder', ['mmorepa', 'tools'])
def test_no_function_over_the_limit(folder):
    long = [f'{p.relative_to(ROOT)}: {f}' for p in sorted((ROOT / folder).rglob('*.py'))
            for f in _long_functions(p.read_text(), MAX_FUNCTION_LINES)]
    assert not long, '\n'.join(long)

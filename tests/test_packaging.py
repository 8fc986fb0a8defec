"""``install_requires`` declares what ``import mmorepa`` needs."""
import ast
import re
import sys
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'mmorepa'


def _name(requirement: str) -> str:
    return re.split(r'[<>=!~;\[ ]', requirement, maxsplit=1)[0].strip().lower().replace('_', '-')


def _module_level_imports(path: Path):
    """Top-level names of the absolute imports a module runs when it is imported."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            yield from (a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split('.')[0]


def test_install_requires_covers_what_import_mmorepa_imports():
    files = sorted(PACKAGE.rglob('*.py'))  # all of the package, not only what `import` loads
    declared = {_name(r) for r in metadata.requires('mmorepa') if 'extra ==' not in r}
    owners = metadata.packages_distributions()
    needed = {m for f in files for m in _module_level_imports(f)}
    missing = {}
    for module in needed - set(sys.stdlib_module_names) - {'mmorepa'}:
        dists = {d.lower().replace('_', '-') for d in owners.get(module, [module])}
        if not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f'imported by `import mmorepa` but not in install_requires: {missing}'
    assert {'torch', 'numpy', 'mmengine', 'mmcv', 'opencv-python'} <= declared

"""Builds mmorepa; its metadata is in pyproject.toml.

The C++ extension ``mmorepa._squeeze_cpu`` (mmorepa/csrc/squeeze_cpu.cpp; the OREPA squeeze's
memory-bound branches on the CPU) is built only with ``MMOREPA_BUILD_EXT=1``, which needs torch and a
C++ compiler in the build environment::

    MMOREPA_BUILD_EXT=1 pip install --no-build-isolation -e .

Otherwise nothing is compiled and torch is not imported: the package then runs the squeeze on
torch's operators. Beside each binary the build writes its record (``<binary>.json``: torch version,
C++ ABI, source hash, compiler flags); ``mmorepa.ops.extension`` loads the binary only where the
record fits.
"""
import importlib.util
import json
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SOURCE = 'mmorepa/csrc/squeeze_cpu.cpp'


def _extension_module():
    """mmorepa/ops/extension.py loaded on its own (it needs torch only, not the package)."""
    spec = importlib.util.spec_from_file_location('_mmorepa_extension',
                                                  ROOT / 'mmorepa/ops/extension.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_options():
    """``ext_modules`` and ``cmdclass`` for setup() where MMOREPA_BUILD_EXT=1, else none."""
    if os.environ.get('MMOREPA_BUILD_EXT', '0') != '1':
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as err:
        raise SystemExit(f'MMOREPA_BUILD_EXT=1 needs torch in the build environment ({err}): '
                         'install torch, then pip install --no-build-isolation ...') from None
    extension = _extension_module()
    text = json.dumps(extension.build_record(ROOT / SOURCE)) + '\n'

    def record_path(binary):
        return Path(binary + extension.RECORD_SUFFIX)

    class BuildExtensionWithRecord(BuildExtension):
        """torch's build_ext, writing each binary's build record beside it: where it is built
        and, for an in-place or editable build, where it is copied to."""

        def build_extension(self, ext):
            stamp = record_path(self.get_ext_fullpath(ext.name))
            # a binary built for another torch or source is rebuilt, not kept as up to date
            self.force = self.force or not stamp.is_file() or stamp.read_text() != text
            super().build_extension(ext)
            stamp.write_text(text)

        def run(self):
            super().run()
            if self.inplace:
                for ext in self.extensions:
                    record_path(self.get_ext_fullpath(ext.name)).write_text(text)

    # the AVX2 path is chosen at run time
    ext = CppExtension('mmorepa._squeeze_cpu', [SOURCE], extra_compile_args=extension.COMPILE_ARGS,
                       extra_link_args=extension.LINK_ARGS)
    return {'ext_modules': [ext], 'cmdclass': {'build_ext': BuildExtensionWithRecord}}


setup(**extension_options())

"""mmorepa: Online Convolutional Re-parameterization (OREPA, CVPR 2022) for OpenMMLab."""
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent


def read_requirements(name):
    lines = (ROOT / 'requirements' / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith('#')]


setup(
    name='mmorepa',
    version='0.1.0',
    description='Online Convolutional Re-parameterization (OREPA) for mmpretrain, mmdet and mmseg',
    long_description=(ROOT / 'README.md').read_text() if (ROOT / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmorepa', 'mmorepa.*']),
    python_requires='>=3.9',
    install_requires=['torch'] + read_requirements('runtime.txt'),
    extras_require={
        'mm': read_requirements('mminstall.txt'),
        'tests': read_requirements('tests.txt'),
    },
    # the squeeze's memory-bound branches in one pass on the CPU (mmorepa/kernels.py falls back to
    # torch's operators where it is missing); the AVX2 path is chosen at run time
    ext_modules=[CppExtension('mmorepa._squeeze_cpu', ['mmorepa/csrc/squeeze_cpu.cpp'],
                              extra_compile_args=['-O3', '-Wno-psabi'])],
    cmdclass={'build_ext': BuildExtension},
    license='Apache-2.0',
)

"""Build script. The CUDA extension is optional: ``LORAKERN_BUILD_CUDA=1 pip install .`` builds it
ahead of time (architectures from ``LORAKERN_CUDA_ARCHS``, default ``8.0;9.0``); otherwise the
package installs as pure Python and ``lorakern.cuda`` builds it on first use with ninja. Either
way the wheel carries csrc/ as ``lorakern/csrc/`` for builds in the installed copy."""
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # PEP 517 backends leave it off
import lorakern_build  # noqa: E402


class BuildPy(build_py):
    """build_py that also copies csrc/ into the package (an editable install reads it in place)."""

    def run(self):
        super().run()
        if not self.editable_mode:
            dest = os.path.join(self.build_lib, lorakern_build.INSTALLED_CSRC)
            for src in lorakern_build.shipped():
                target = os.path.join(dest, os.path.relpath(src, lorakern_build.CSRC))
                self.mkpath(os.path.dirname(target))
                self.copy_file(src, target)


ext_modules, cmdclass = [], {}
if os.environ.get("LORAKERN_BUILD_CUDA") == "1":
    ext_modules, cmdclass = lorakern_build.cuda_extension()  # only needs torch when asked

setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPy})

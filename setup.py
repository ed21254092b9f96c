"""Build script. The CUDA extension is optional: ``LORAKERN_BUILD_CUDA=1 pip install .`` builds it
ahead of time (architectures from ``LORAKERN_CUDA_ARCHS``, default ``8.0;9.0``); otherwise the
package installs as pure Python and ``lorakern.cuda`` builds it on first use with ninja."""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("LORAKERN_BUILD_CUDA") == "1":
    from lorakern_build import cuda_extension  # noqa: E402  (only needs torch when asked)

    ext_modules, cmdclass = cuda_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass)

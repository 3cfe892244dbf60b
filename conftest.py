"""pytest, for the package's tests and the chapters (nbval): the book's numerics configuration.

Set here, before any test module imports torch or NumPy, so that a bare ``pytest`` runs under the
same configuration as ``make test``; pytest-xdist workers and nbval's notebook kernels inherit the
environment (refimpl/numerics.py).
"""

from refimpl import numerics

numerics.set_environment()


def pytest_configure(config):
    numerics.apply()

"""Package layout only (metadata is in pyproject.toml).

conf/ sits at the top of the checkout, one place to read and edit the config tree; a wheel carries it
inside the package as ldm_train/conf so an installed copy finds it too (ldm_train/config.py).
pyproject.toml alone cannot add a package mapped from another folder to the ones it finds.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["ldm_train", "ldm_train.*"]), "ldm_train.conf"],
    package_dir={"ldm_train.conf": "conf"},
    package_data={"ldm_train.conf": ["*.yaml", "**/*.yaml"]},
)

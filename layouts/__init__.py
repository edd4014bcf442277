"""Melter's built-in layouts, one YAML file each: edit them here.

setup.py installs this folder as the package ``melter.layout.builtin``, so that
``importlib.resources`` finds the files in a wheel, in a build from the sdist and in an editable
install alike. This file makes the folder a regular package; the editable install's import
hook maps only folders that have one.
"""

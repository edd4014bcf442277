"""Shared test setup. The tests are a package (``tests``) mirroring ``melter``'s; their helpers
(the MJR writer, media measurements, the farm, service and Janus harnesses) are the package
``tests.helpers``, which the benchmarks import too."""

"""The optional extras, and the one-line error a command gives when its extra is missing.

``pip install melter`` is the media core (inspect, convert, plan, preview, render). The farm,
the service and the deployment tools need libraries a laptop that only renders has no use for,
so they are extras (pyproject.toml). A command of an extra that is not installed stops with
the ``pip install`` line to run, exit code 1, rather than a traceback from an import deep
inside it; so the checks look the modules up without importing them.
"""

from __future__ import annotations

from importlib.util import find_spec

from melter.errors import MelterError

# The top-level modules each extra brings (pyproject.toml lists the distributions).
PROVIDES: dict[str, tuple[str, ...]] = {
    "farm": ("celery", "kombu", "redis", "flower"),
    "serve": ("fastapi", "starlette", "uvicorn", "prometheus_client"),
    "deploy": ("docker",),
}
# What the commands of each extra import: the service queues farm jobs, so it needs the farm's
# modules too (its extra installs them); only `melter flower` needs flower itself.
NEEDS: dict[str, tuple[str, ...]] = {
    "farm": ("celery", "kombu", "redis"),
    "serve": ("fastapi", "starlette", "uvicorn", "prometheus_client", "celery", "kombu",
              "redis"),
    "deploy": ("docker",),
}


class MissingExtraError(MelterError):
    """A command whose optional dependencies are not installed."""

    def __init__(self, extra: str, what: str, missing: list[str]) -> None:
        self.extra = extra
        super().__init__(f"{what} needs the {extra} extra ({', '.join(missing)} not "
                         f"installed): pip install 'melter[{extra}]'")


def _installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, what: str, *also: str) -> None:
    """Raise :class:`MissingExtraError` unless the modules of ``extra`` (and ``also``, for a
    command that needs one more) can be imported. ``what`` names the command for the user."""
    missing = [m for m in (*NEEDS[extra], *also) if not _installed(m)]
    if missing:
        raise MissingExtraError(extra, what, missing)


def extra_for(module: str | None) -> str | None:
    """The extra that provides ``module`` (a dotted name), if any: for an import that fails
    on a path no :func:`require` guards."""
    top = (module or "").partition(".")[0]
    return next((extra for extra, modules in PROVIDES.items() if top in modules), None)


def missing_module_message(exc: ModuleNotFoundError) -> str | None:
    """One line for an import of an extra's module that failed, or None for any other."""
    extra = extra_for(exc.name)
    if extra is None:
        return None
    return (f"{exc.name} is not installed; it comes with the {extra} extra: "
            f"pip install 'melter[{extra}]'")

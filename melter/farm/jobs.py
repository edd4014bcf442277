"""The farm as a library: submit, status, jobs, cancel, retry — and what workers share.

:class:`Farm` ties one configuration to its Redis state (:class:`~melter.farm.store.Store`) and
its Celery app. A message is only a wake-up call naming ``(job, unit, token)``; everything a
worker needs is in Redis. Messages are sent at least once (a dispatch is written to Redis
first, and the sweeper sends it again if its sender died before confirming); the token check
when a worker takes the unit makes a duplicate start nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery

from melter.errors import MelterError
from melter.farm.allow import callback_refusal
from melter.farm.callbacks import Outbox
from melter.farm.celery_app import TASK, client_app
from melter.farm.config import FarmConfig, load_config, require_broker
from melter.farm.job import (
    TERMINAL,
    JobError,
    JobSpec,
    JobState,
    OutputSpec,
    Priority,
    UnitKind,
    UnitState,
    iso,
    parse_job,
    under_root,
)
from melter.farm.manifest import is_live_output
from melter.farm.paths import check_inputs, resolve_layout, same_place
from melter.farm.store import Dispatch, Store

log = logging.getLogger("melter.farm")

TMP_DIR = ".melter-tmp"


@dataclass(frozen=True)
class OutputTarget:
    path: Path
    preset: str
    requested: str


@dataclass
class JobRecord:
    """A job as the workers see it: the spec, and the paths the submitter resolved."""

    id: str
    spec: JobSpec
    inputs: list[Path]
    outputs: list[OutputTarget]
    created: float
    fields: dict[str, str]

    def tmp_dir(self, k: int) -> Path:
        return self.outputs[k].path.parent / TMP_DIR / self.id


def versioned(path: Path, version: int) -> Path:
    """``out.mp4``, then ``out.v2.mp4``, ``out.v3.mp4``…"""
    if version <= 1:
        return path
    return path.with_name(f"{path.stem}.v{version}{path.suffix}")


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


class Farm:
    """One farm: a configuration, its Redis state and its Celery app (``celery``: a worker's
    own; by default the farm's :func:`~melter.farm.celery_app.client_app`, made when first
    needed)."""

    def __init__(self, config: FarmConfig | None = None, celery: Celery | None = None) -> None:
        self.config = config or load_config()
        self.store = Store.from_url(require_broker(self.config), self.config.key_prefix)
        self._celery = celery

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            self._celery = client_app(self.config)
        return self._celery

    @property
    def ttl(self) -> int:
        return int(self.config.job_ttl_days * 86400)

    # -- dispatch ----------------------------------------------------------------------------
    def send(self, items: Iterable[Dispatch]) -> None:
        """Send the Celery messages for queued units, then confirm them."""
        queues: dict[str, str] = {}
        for item in items:
            if item.job not in queues:
                queues[item.job] = self.store.r.hget(self.store.job_key(item.job), "queue") or (
                    self.config.queue("auto"))
            queue = queues[item.job]
            result = self.celery.send_task(TASK, args=[item.job, item.unit, item.token],
                                           queue=queue, routing_key=queue)
            self.store.set_unit_fields(item.job, item.unit, {"task_id": result.id})
            self.store.dispatched(item)

    # -- submission --------------------------------------------------------------------------
    def submit(self, spec: JobSpec | dict[str, Any],
               rule_layouts: dict[str, dict[str, Any]] | None = None) -> str:
        """Accept a job; its id (the first job's, for a repeated idempotency key).
        ``rule_layouts``: those of the job being rendered again (its layout file's relative
        rule names were resolved from that file's folder, which the inlined document lost)."""
        job = spec if isinstance(spec, JobSpec) else parse_job(spec)
        config = self.config
        inputs = []
        for item in job.inputs:
            path = under_root(item, config.storage_root, "input", "MELTER_STORAGE_ROOT")
            if not path.exists():
                raise JobError(f"input {item}: no such file or folder under the storage root")
            inputs.append(path)
        check_inputs(inputs, config.storage_root)
        layout_value, rule_layouts = resolve_layout(job.layout, config.storage_root,
                                                    rule_layouts)
        if job.callback_url and config.callback_allow:

            refusal = callback_refusal(job.callback_url, config.callback_allow)
            if refusal is not None:
                raise JobError(f"callback_url {refusal}")
        from melter.render import preset_for

        targets: list[tuple[Path, str, str]] = []
        for output in job.outputs:
            root_var = "MELTER_OUTPUT_ROOT" if config.output_root else "MELTER_STORAGE_ROOT"
            label = "the output root" if config.output_root else "the storage root"
            path = under_root(output.path, config.outputs_root, "output", root_var, label)
            if path.is_dir():
                raise JobError(f"output {output.path} is a folder; give a file name")
            targets.append((path, preset_for(path, output.preset).name, output.path))
        normal = job.model_copy(update={"layout": layout_value})
        body = normal.model_dump(mode="json")
        fingerprint = hashlib.sha256(json.dumps(
            {k: v for k, v in body.items() if k != "idempotency_key"}, sort_keys=True).encode()
        ).hexdigest()
        job_id = secrets.token_hex(8)
        if job.idempotency_key:
            existing = self.store.idempotent(job.idempotency_key, job_id, self.ttl)
            if existing:
                return self._same_job(existing, fingerprint, job.idempotency_key)
        try:
            return self._create(job_id, job, body, inputs, targets, fingerprint,
                                rule_layouts)
        except BaseException:
            if job.idempotency_key:  # the key must not name a job that was never made
                self.store.release_idempotency(job.idempotency_key, job_id)
            raise

    def _create(self, job_id: str, job: JobSpec, body: dict[str, Any], inputs: list[Path],
                targets: list[tuple[Path, str, str]], fingerprint: str,
                rule_layouts: dict[str, dict[str, Any]]) -> str:
        config = self.config
        outputs = []
        for path, preset_name, requested in targets:
            # A prerender writes no output: the render of the finished meeting takes the name.
            final = path if job.prerender else self._reserve(path, job_id)
            outputs.append({"path": str(final), "preset": preset_name, "requested": requested})
        now = time.time()
        fields = {
            "spec": json.dumps(body),
            "inputs": json.dumps([str(p) for p in inputs]),
            "outputs": json.dumps(outputs),
            "priority": job.priority,
            "queue": config.queue(job.priority),
            "max_attempts": str(job.max_attempts or config.max_attempts),
            "fingerprint": fingerprint,
            "notify": "1" if job.callback_url else "0",
            "rule_layouts": json.dumps(rule_layouts),
        }
        first = self.store.create(job_id, fields, now, config.dispatch_grace_seconds)
        try:
            self.send([first])
        except Exception as exc:  # the job is stored: a sweeper sends its message later
            log.warning("job %s: message not sent (%s); a worker's sweeper will send it",
                        job_id, exc)
        return job_id

    def _same_job(self, existing: str, fingerprint: str, key: str) -> str:
        deadline = time.monotonic() + 10
        while True:
            found = self.store.r.hget(self.store.job_key(existing), "fingerprint")
            if found is not None:
                break
            if time.monotonic() > deadline:
                return existing
            time.sleep(0.05)
        if found != fingerprint:
            raise JobError(f"idempotency key {key!r} was already used for job {existing} "
                           "with different parameters")
        return existing

    def _reserve(self, path: Path, job_id: str) -> Path:
        for version in range(1, 10_000):
            candidate = versioned(path, version)
            if (candidate.exists() or manifest_path(candidate).exists()) \
                    and not is_live_output(candidate):
                continue  # a live playlist is the meeting's own: its render takes its place
            if self.store.reserve_output(str(candidate), job_id, self.ttl):
                return candidate
        raise JobError(f"output {path}: no free version name")

    # -- reading -----------------------------------------------------------------------------
    def record(self, job_id: str) -> JobRecord:
        fields = self.store.job(job_id)
        if not fields:
            raise MelterError(f"no job {job_id}")
        spec = JobSpec.model_validate_json(fields["spec"])
        outputs = [OutputTarget(Path(o["path"]), o["preset"], o.get("requested", o["path"]))
                   for o in json.loads(fields["outputs"])]
        return JobRecord(job_id, spec, [Path(p) for p in json.loads(fields["inputs"])],
                         outputs, float(fields.get("created", 0)), fields)

    def status(self, job_id: str) -> dict[str, Any]:
        fields = self.store.job(job_id)
        if not fields:
            raise MelterError(f"no job {job_id} (unknown, or its state expired)")
        units = self.store.all_units(job_id)
        history = self.store.history(job_id)
        state = fields.get("state", JobState.QUEUED)
        weight = sum(float(u.get("weight") or 0) for u in units.values())
        done = sum(float(u.get("weight") or 0) * float(u.get("fraction") or 0)
                   for u in units.values())
        progress = 1.0 if state == JobState.DONE else (done / weight if weight else 0.0)
        created = _float(fields.get("created"))
        started = _float(fields.get("started"))
        finished = _float(fields.get("finished"))
        now = time.time()
        eta = None
        if state in (JobState.RUNNING, JobState.JOINING) and started and progress > 0.01:
            elapsed = now - started
            eta = round(elapsed * (1 - progress) / progress, 1)
        outputs = json.loads(fields.get("outputs") or "[]")
        spec = json.loads(fields.get("spec") or "{}")
        lost = [h for h in history if h.get("outcome") == "lost"]
        result: dict[str, Any] = {
            "state": state,
            "id": job_id,
            "stage": fields.get("stage", state),
            "progress": round(progress * 100, 1),
            "eta_s": eta,
            "attempts": int(fields.get("attempts") or 0),
            "max_attempts": int(fields.get("max_attempts") or self.config.max_attempts),
            "worker": fields.get("worker"),
            "error": fields.get("error") if state in (JobState.FAILED, JobState.CANCELLED)
            else None,
            "priority": fields.get("priority"),
            "outputs": [o["path"] for o in outputs],
            "manifests": [str(manifest_path(Path(o["path"]))) for o in outputs],
            "requested_outputs": [o.get("requested") for o in outputs],
            "timings": {
                "submitted": iso(created),
                "started": iso(started),
                "finished": iso(finished),
                "queued_s": round(started - created, 3) if started and created else None,
                "running_s": round((finished or now) - started, 3) if started else None,
                "total_s": round(finished - created, 3) if finished and created else None,
            },
            "lost_workers": [h.get("worker") for h in lost],
            "history": [self._history_entry(h) for h in history],
            "chunks": int(fields.get("chunks") or 0),
            "units": {
                name: {
                    "state": u.get("state"),
                    "attempts": int(u.get("attempts") or 0),
                    "worker": u.get("worker"),
                    "progress": round(float(u.get("fraction") or 0) * 100, 1),
                    "stage": u.get("stage"),
                    **({"frames": [int(u["first"]), int(u["last"])]}
                       if u.get("first") else {}),
                }
                for name, u in units.items()
            },
            "callback": fields.get("callback"),
            "metadata": spec.get("metadata", {}),
            "spec": spec,
        }
        return result

    @staticmethod
    def _history_entry(entry: dict[str, Any]) -> dict[str, Any]:
        out = dict(entry)
        for key in ("started", "ended"):
            if isinstance(out.get(key), (int, float)):
                out[key] = iso(out[key])
        return out

    def jobs(self, limit: int = 50, state: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        gone = []
        for job_id in self.store.job_ids(limit * 4 if state else limit):
            try:
                info = self.status(job_id)
            except MelterError:
                gone.append(job_id)
                continue
            if state and info["state"] != state:
                continue
            out.append(info)
            if len(out) >= limit:
                break
        self.store.forget(gone)
        return out

    # -- control -----------------------------------------------------------------------------
    def cancel(self, job_id: str, wait: float = 10.0) -> str:
        """Cancel a job. Returns ``cancelled``; or ``committing`` when it was writing its output
        for ``wait`` seconds; or ``already <state>`` for a job that had ended. Running attempts
        stop (their melt killed) within a heartbeat."""
        deadline = time.monotonic() + wait
        while True:
            result, detail = self.store.cancel(job_id)
            if result == "gone":
                raise MelterError(f"no job {job_id}")
            if result == "committing" and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            break
        if result == "ended":
            return f"already {detail[0]}"
        if result == "cancelled" and not detail:
            self.finalize(job_id)
        return result

    def retry(self, job_id: str) -> str:
        """Run a failed or cancelled job again (same id); a done job is rendered again as a new
        job writing new versions of its outputs (its id is returned)."""
        fields = self.store.job(job_id)
        if not fields:
            raise MelterError(f"no job {job_id}")
        state = fields.get("state")
        if state == JobState.DONE:
            spec = JobSpec.model_validate_json(fields["spec"])
            outputs = [OutputSpec(path=o["requested"], preset=o["preset"])
                       for o in json.loads(fields["outputs"])]
            again = spec.model_copy(update={
                "idempotency_key": None, "priority": Priority.MANUAL, "outputs": outputs,
                "metadata": {**spec.metadata, "rerender_of": job_id}})
            return self.submit(again, json.loads(fields.get("rule_layouts") or "{}"))
        result, token = self.store.reset(job_id, self.config.dispatch_grace_seconds, self.ttl)
        if result == "busy":
            raise MelterError(f"job {job_id} is still stopping an attempt ({token}); "
                              "try again in a few seconds")
        if result == "state":
            raise MelterError(f"job {job_id} is {token}: only failed or cancelled jobs are "
                              "retried, and done jobs rendered again")
        if result != "ok":
            raise MelterError(f"no job {job_id}")
        for path in json.loads(fields["outputs"]):
            self.store.reserve_output(path["path"], job_id, self.ttl)
        self.send([Dispatch(job_id, UnitKind.MAIN.value, token)])
        return job_id

    # -- ending ------------------------------------------------------------------------------
    def finalize(self, job_id: str) -> None:
        """Once a job has ended and nothing of it runs: drop its scratch files and set its
        state to expire (its callback is queued by the state change itself)."""
        fields = self.store.job(job_id)
        state = fields.get("state")
        if state not in TERMINAL:
            return
        units = self.store.all_units(job_id)
        if any(u.get("state") in (UnitState.RUNNING, UnitState.COMMITTING)
               for u in units.values()):
            return
        if not self.store.mark_once(job_id, f"final:{fields.get('finished')}", self.ttl):
            return
        try:
            record = self.record(job_id)
            for k in range(len(record.outputs)):
                remove_tmp(record.tmp_dir(k))
        except (OSError, MelterError, ValueError) as exc:
            log.warning("job %s: could not remove scratch files: %s", job_id, exc)
        self.store.expire_finished(job_id, self.ttl)

    def notify(self, limit: int = 20) -> int:
        """Deliver the due status callbacks once (workers and the service do this in the
        background); how many were delivered."""
        return Outbox(self).deliver_due(limit)


def remove_tmp(folder: Path) -> None:
    """Drop a job's scratch folder, unless a component of its path has become a link since
    the job was submitted (removing through it would delete outside the root)."""
    if not same_place(folder):
        log.warning("not removing %s: its folder has been replaced by a link", folder)
        return
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    if parent.name == TMP_DIR:
        with contextlib.suppress(OSError):
            parent.rmdir()


_FARMS: dict[int, Farm] = {}


def farm_for(config: FarmConfig | None = None, celery: Celery | None = None) -> Farm:
    """A Farm for this process (rebuilt after a fork: connections are not shared); with
    ``celery``, one that sends through that app."""
    key = os.getpid()
    farm = _FARMS.get(key)
    if farm is None or (config is not None and farm.config != config) or (
            celery is not None and farm._celery is not celery):
        farm = Farm(config, celery)
        _FARMS.clear()
        _FARMS[key] = farm
    return farm

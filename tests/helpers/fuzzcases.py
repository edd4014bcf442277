"""Seeded damage to real recordings, and a runner that checks what Melter makes of each case.

Each case takes a prefix of one real Janus recording (Opus, VP8 or H.264 from the fixtures; a
prefix of an MJR file is itself a valid MJR file, and keeps a case fast), applies one damage
drawn from :data:`DAMAGE` — the ways a crashed Janus, a bad disk or an attacker change a file —
and runs ``analyze`` (``inspect``), ``convert`` and ``discover`` + ``plan_meeting`` (``plan``)
on it. A case may end in a result or in a :class:`MelterError` (a one-line refusal); anything
else is a *traceback*. A case must also end within :data:`CASE_SECONDS` (else a *hang*) and
inside the worker's address-space cap (else a *cap hit*), and what comes out must hold
together: gaps inside the track, no gap longer than the file's span, silence and output no
longer than the track.

:func:`run` spreads cases over worker processes, each under ``RLIMIT_AS``; a worker that stops
answering is killed and its case counted as a hang. ``bench/fuzz_bench.py`` runs 100 000
cases; ``tests/track/test_fuzz.py`` a seeded slice.
"""

from __future__ import annotations

import json
import os
import random
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.mjrwriter import frame_offsets

FIXTURES = Path(__file__).parent.parent / "fixtures"
#: (name, recording, frames kept): about 3 s of each.
BASES = [
    ("opus", "dev-three-party-vp8/videoroom-2001-user-501-1795700513534356-audio-0.mjr", 150),
    ("vp8", "dev-three-party-vp8/videoroom-2001-user-501-1795700513534447-video-1.mjr", 120),
    ("h264", "dev-two-party-h264/videoroom-2002-user-511-1795700544681330-video-1.mjr", 150),
]
DAMAGE = ["flip", "overwrite", "truncate", "insert", "splice", "length", "rtp", "arrival",
          "header"]
#: Wall-clock limit of one case (inspect, convert and plan together).
CASE_SECONDS = 20.0
#: Address-space cap of each worker process.
CAP_BYTES = 3 << 30


@dataclass(frozen=True)
class Base:
    codec: str
    data: bytes
    offsets: list[int]  # frame prefixes


def load_bases() -> list[Base]:
    bases = []
    for codec, relative, keep in BASES:
        data = (FIXTURES / relative).read_bytes()
        offsets = frame_offsets(FIXTURES / relative)
        bases.append(Base(codec, data[: offsets[keep]], offsets[:keep]))
    return bases


def damage(rng: random.Random, base: Base) -> tuple[str, bytes]:
    """One seeded damage of ``base``: its kind and the damaged bytes."""
    out = bytearray(base.data)
    offsets = base.offsets
    first = offsets[0]
    kind = rng.choice(DAMAGE)
    if kind == "flip":
        for _ in range(rng.randint(1, 32)):
            bit = rng.randrange(first * 8, len(out) * 8)
            out[bit // 8] ^= 1 << (bit % 8)
    elif kind == "overwrite":
        pos = rng.randrange(first, len(out))
        size = rng.randint(1, 64)
        out[pos:pos + size] = rng.randbytes(size)[: len(out) - pos]
    elif kind == "truncate":
        del out[rng.randrange(0, len(out)):]
    elif kind == "insert":
        pos = rng.choice(offsets) if rng.random() < 0.5 else rng.randrange(first, len(out))
        garbage = rng.randbytes(rng.randint(1, 300))
        if rng.random() < 0.3:
            garbage = b"MEET" + garbage  # a false frame prefix
        out[pos:pos] = garbage
    elif kind == "splice":
        # A run of frames copied from elsewhere in the file (a replayed disk block).
        a, b = sorted(rng.sample(range(len(offsets)), 2))
        end = offsets[min(b + rng.randint(1, 20), len(offsets) - 1)]
        out[offsets[a]:offsets[a]] = bytes(out[offsets[b]:end])
    elif kind == "length":
        for _ in range(rng.randint(1, 3)):
            offset = rng.choice(offsets)
            value = rng.choice([0, 1, 11, 12, 1500, 1501, 0xFFFF, rng.randrange(0x10000)])
            out[offset + 8:offset + 10] = struct.pack("!H", value)
    elif kind == "rtp":
        for _ in range(rng.randint(1, 4)):
            rtp = rng.choice(offsets) + 10
            part = rng.choice(["b0", "b1", "seq", "ts", "ssrc", "ext"])
            if part == "b0":  # CC, X and P bits
                out[rtp] = 0x80 | rng.randrange(0x40)
            elif part == "b1":  # marker and payload type
                out[rtp + 1] = rng.randrange(0x100)
            elif part == "seq":
                out[rtp + 2:rtp + 4] = rng.randbytes(2)
            elif part == "ts":
                out[rtp + 4:rtp + 8] = rng.randbytes(4)
            elif part == "ssrc":
                out[rtp + 8:rtp + 12] = rng.randbytes(4)
            else:  # the extension length word
                out[rtp + 14:rtp + 16] = rng.randbytes(2)
    elif kind == "arrival":
        # One or a few arrival times: one byte changed, or the whole u32 replaced.
        for _ in range(rng.choice([1, 1, 1, 2, 5])):
            offset = rng.choice(offsets) + 4
            if rng.random() < 0.5:
                out[offset + rng.randrange(4)] = rng.randrange(0x100)
            else:
                out[offset:offset + 4] = rng.randbytes(4)
    else:  # header: one byte of the magic, the JSON's length or the JSON
        pos = rng.randrange(0, first)
        out[pos] = rng.randrange(0x100)
    return kind, bytes(out)


def case_input(seed: int, number: int, bases: list[Base]) -> tuple[str, str, bytes]:
    """Case ``number`` of the run seeded ``seed``: (codec, damage kind, bytes)."""
    rng = random.Random(seed * 1_000_003 + number)
    base = rng.choice(bases)
    kind, data = damage(rng, base)
    return base.codec, kind, data


# -- one case ----------------------------------------------------------------------------------
class Inconsistent(AssertionError):
    """A result that does not hold together."""


def check_case(codec: str, data: bytes, folder: Path) -> str:
    """Run inspect, convert and plan on one damaged file: ``ok`` or ``refused`` (one or more
    steps refused it with a MelterError). Raises anything else."""
    from melter.compose import plan_meeting
    from melter.convert import convert
    from melter.errors import MelterError
    from melter.layout.model import load_layout
    from melter.meeting import discover
    from melter.track import analyze

    kind = "audio" if codec == "opus" else "video"
    path = folder / f"videoroom-1-user-7-1-{kind}-0.mjr"
    path.write_bytes(data)
    refused = False
    try:
        analysis = analyze(path)
    except MelterError:
        return "refused"
    span = analysis.end_us - analysis.start_us
    if span < 0:
        raise Inconsistent(f"ends before it starts ({span} us)")
    if sum(g.length_us for g in analysis.gaps) > span + 1000:
        raise Inconsistent("gaps outlast the track")
    for gap in analysis.gaps:
        if not analysis.start_us - 1000 <= gap.start_us <= analysis.end_us + 1000:
            raise Inconsistent("a gap outside the track")
    if span > 3_600_000_000:
        raise Inconsistent(f"a 3 s recording spans {span / 3.6e9:.1f} h")
    suffixes = {"opus": (".webm", ".opus"), "vp8": (".webm",), "h264": (".mp4",)}[codec]
    for suffix in suffixes:
        output = folder / f"out{suffix}"
        try:
            report = convert([path], output)
        except MelterError:
            refused = True
            if output.exists():
                raise Inconsistent("a refused conversion left an output") from None
            continue
        if report.silence_ms * 1000 > report.duration_us + 100_000:
            raise Inconsistent("more silence than track")
        if output.stat().st_size > 50 * len(data) + 1_000_000:
            raise Inconsistent(f"{output.stat().st_size} bytes out of {len(data)}")
        output.unlink()
    try:
        meeting = discover([folder])
        plan_meeting(meeting, load_layout("grid"))
    except MelterError:
        refused = True
    return "refused" if refused else "ok"


def _worker(seed: int, first: int, last: int) -> None:
    """Child process: cases ``first`` to ``last``, one JSON line each on stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))
    bases = load_bases()

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError("case ran over its time limit")

    signal.signal(signal.SIGALRM, alarm)
    out = sys.stdout
    for number in range(first, last + 1):
        codec, kind, data = case_input(seed, number, bases)
        out.write(json.dumps({"start": number}) + "\n")
        out.flush()
        folder = Path(tempfile.mkdtemp(prefix="melter-fuzz-"))
        began = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        try:
            outcome, detail = check_case(codec, data, folder), ""
        except TimeoutError:
            outcome, detail = "hang", ""
        except MemoryError:
            outcome, detail = "cap", ""
        except Inconsistent as exc:
            outcome, detail = "inconsistent", str(exc)
        except BaseException as exc:  # every other exception is a finding
            outcome = "traceback"
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            detail += " | " + traceback.format_tb(exc.__traceback__)[-1].strip().splitlines()[0]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            shutil.rmtree(folder, ignore_errors=True)
        out.write(json.dumps({"case": number, "codec": codec, "kind": kind, "outcome": outcome,
                              "detail": detail, "s": round(time.monotonic() - began, 4)}) + "\n")
        out.flush()
        if outcome == "cap":
            return  # the process's heap may be in any state: the runner starts a new one


@dataclass
class _Worker:
    child: subprocess.Popen[str]
    last: int  # the last case of its range
    done: int  # the last case it finished
    case: int | None = None  # the case in progress
    began: float = 0.0


@dataclass
class Summary:
    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)  # failed cases
    slowest: list[tuple[float, int]] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, record: dict) -> None:
        self.cases += 1
        outcome = record["outcome"]
        self.outcomes[outcome] += 1
        self.by_kind.setdefault(f"{record['codec']}/{record['kind']}", Counter())[outcome] += 1
        if outcome not in ("ok", "refused"):
            self.findings.append(record)
        self.slowest = sorted([*self.slowest, (record["s"], record["case"])], reverse=True)[:5]

    @property
    def failures(self) -> int:
        return sum(n for outcome, n in self.outcomes.items() if outcome not in ("ok", "refused"))


def run(seed: int, cases: int, workers: int = os.cpu_count() or 1,
        progress: bool = False) -> Summary:
    """Cases ``0`` to ``cases - 1`` of ``seed`` over ``workers`` processes."""
    summary = Summary()
    began = time.monotonic()
    pending = list(range(cases))
    chunk = max(1, min(500, cases // (workers * 4) or 1))
    selector = selectors.DefaultSelector()
    running: dict[int, _Worker] = {}

    def start(first: int, last: int) -> None:
        child = subprocess.Popen(
            [sys.executable, "-c",
             f"from tests.helpers import fuzzcases; fuzzcases._worker({seed}, {first}, {last})"],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        assert child.stdout is not None
        running[child.pid] = _Worker(child, last, first - 1)
        selector.register(child.stdout, selectors.EVENT_READ, child.pid)

    def start_next() -> None:
        if pending:
            taken = pending[:chunk]
            del pending[:chunk]
            start(taken[0], taken[-1])

    def stop(worker: _Worker) -> None:
        """Kill a worker; the rest of its range goes to a new one."""
        running.pop(worker.child.pid)
        assert worker.child.stdout is not None
        selector.unregister(worker.child.stdout)
        worker.child.kill()
        worker.child.wait()
        if worker.done < worker.last:
            start(worker.done + 1, worker.last)
        else:
            start_next()

    for _ in range(workers):
        start_next()
    last_report = time.monotonic()
    while running:
        for key, _ in selector.select(timeout=1.0):
            worker = running.get(key.data)
            if worker is None:
                continue
            assert worker.child.stdout is not None
            line = worker.child.stdout.readline()
            if not line:  # the worker died: killed by the cap outside Python, or crashed
                if worker.case is not None:
                    code = worker.child.wait()
                    summary.add({"case": worker.case, "codec": "?", "kind": "?", "s": 0.0,
                                 "outcome": "crash", "detail": f"worker exited with {code}"})
                    worker.done = worker.case
                    worker.case = None
                stop(worker)
                continue
            record = json.loads(line)
            if "start" in record:
                worker.case, worker.began = record["start"], time.monotonic()
                continue
            summary.add(record)
            worker.case, worker.done = None, record["case"]
            if record["case"] == worker.last or record["outcome"] == "cap":
                stop(worker)
        now = time.monotonic()
        for worker in list(running.values()):
            if worker.case is not None and now - worker.began > CASE_SECONDS + 10:
                summary.add({"case": worker.case, "codec": "?", "kind": "?",
                             "s": round(now - worker.began, 1), "outcome": "hang",
                             "detail": "no answer; killed"})
                worker.done, worker.case = worker.case, None
                stop(worker)
        if progress and now - last_report > 60:
            last_report = now
            rate = summary.cases / (now - began)
            print(f"  {summary.cases} cases, {rate:.1f}/s, {dict(summary.outcomes)}", flush=True)
    summary.seconds = time.monotonic() - began
    return summary

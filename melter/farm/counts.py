"""Job counters kept by the store's scripts, so that ``/metrics`` reads a few numbers instead of
every job (a scrape stays in milliseconds with hundreds of thousands of jobs in Redis).

Keys (``P`` is the configured prefix)::

    P:counts    hash: state:<state> jobs per state; render:count, render:sum_us and
                render:le:<bucket> the render seconds of done jobs; since (when counting began)
    P:tally     hash: job id -> what the job is counted as ("<state>", or "done|<seconds>")
    P:expiring  sorted set: job ids whose record has a time to live, by its end (Unix ms)

Every store script that can change a job ends with ``melter_recount(P, id)``: it compares what
the job counts as now with what ``P:tally`` says it was counted as, and moves the counters by
the difference in the same script. The counters are therefore always the sum of the tally, and
each job's tally entry is what the job was at its last change.

A job record that expires (``MELTER_JOB_TTL_DAYS``) runs no script, so every job whose record
has a time to live is in ``P:expiring`` under the moment it ends (``PEXPIRETIME``, Redis 7).
Reading the counters (:meth:`melter.farm.store.Store.counts`) and every sweep first recount the
jobs whose moment has come, which takes those that are gone out of the counters; so do
``forget`` (the ids ``melter jobs`` found gone) and the rebuild that runs once when
``P:counts`` has no ``since`` (a farm that counted nothing yet, or whose counters were lost).
"""

from __future__ import annotations

from dataclasses import dataclass

from melter.farm.job import JobState

#: Upper bounds (seconds) of the ``melter_render_seconds`` histogram's buckets.
RENDER_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)

_BUCKETS = ", ".join(f"{{{b!r}, {str(b)!r}}}" for b in RENDER_BUCKETS)

#: Lua (after :data:`melter.farm.job.LUA_CONSTANTS`): ``melter_recount(P, id)``.
TALLY = r"""
local MELTER_BUCKETS = {""" + _BUCKETS + r"""}
local function melter_count(P, entry, sign)
  if not entry or entry == '' then return end
  local c = P .. ':counts'
  local state, seconds = entry, nil
  local bar = string.find(entry, '|', 1, true)
  if bar then
    state = string.sub(entry, 1, bar - 1)
    seconds = tonumber(string.sub(entry, bar + 1))
  end
  redis.call('HINCRBY', c, 'state:' .. state, sign)
  if seconds then
    redis.call('HINCRBY', c, 'render:count', sign)
    redis.call('HINCRBY', c, 'render:sum_us',
               string.format('%d', sign * math.floor(seconds * 1e6 + 0.5)))
    for _, b in ipairs(MELTER_BUCKETS) do
      if seconds <= b[1] then redis.call('HINCRBY', c, 'render:le:' .. b[2], sign) end
    end
  end
end
local function melter_recount(P, id)
  local jkey = P .. ':job:' .. id
  local f = redis.call('HMGET', jkey, 'state', 'started', 'finished')
  local now = ''
  local expires = -2
  if f[1] then
    now = f[1]
    if f[1] == JOB.DONE then
      local started, finished = tonumber(f[2] or ''), tonumber(f[3] or '')
      if started and finished then
        now = now .. '|' .. string.format('%.17g', finished - started)
      end
    end
    expires = redis.call('PEXPIRETIME', jkey)
  end
  if expires >= 0 then
    redis.call('ZADD', P .. ':expiring', string.format('%d', expires), id)
  else
    redis.call('ZREM', P .. ':expiring', id)
  end
  local tally = P .. ':tally'
  local was = redis.call('HGET', tally, id) or ''
  if was == now then return end
  melter_count(P, was, -1)
  melter_count(P, now, 1)
  if now == '' then redis.call('HDEL', tally, id) else redis.call('HSET', tally, id, now) end
end
"""


def counted(source: str) -> str:
    """A store script (after the constants) that recounts the job ``ARGV[2]`` when it ends."""
    return (TALLY + "local function melter_counted()\n" + source + "\nend\n"
            "local melter_out = melter_counted()\nmelter_recount(ARGV[1], ARGV[2])\n"
            "return melter_out\n")


#: Recount the jobs ``ARGV[2..]``.
RECOUNT = TALLY + r"""
for i = 2, #ARGV do melter_recount(ARGV[1], ARGV[i]) end
return #ARGV - 1
"""

#: Recount at most ``ARGV[2]`` jobs whose record's time to live has run out (the vanished ones
#: leave the counters), then return how many were due, how many were gone, and the counters.
READ = TALLY + r"""
local P, limit = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', P .. ':expiring', '-inf', string.format('%d', now),
                       'LIMIT', 0, limit)
local gone = 0
for _, id in ipairs(due) do
  if redis.call('EXISTS', P .. ':job:' .. id) == 0 then gone = gone + 1 end
  melter_recount(P, id)
end
return {#due, gone, redis.call('HGETALL', P .. ':counts')}
"""

#: Start counting again from nothing, unless counting has begun (``since``) meanwhile.
RESTART = r"""
local P = ARGV[1]
if redis.call('HEXISTS', P .. ':counts', 'since') == 1 then return 0 end
redis.call('DEL', P .. ':counts', P .. ':tally', P .. ':expiring')
return 1
"""


@dataclass(frozen=True)
class Counts:
    """The counters as ``/metrics`` shows them."""

    states: dict[str, int]
    #: Done jobs with render seconds at most each bound of :data:`RENDER_BUCKETS`, in order.
    render_buckets: list[int]
    render_count: int
    render_seconds: float
    counting: bool  # False while the counters are being rebuilt (or could not be)

    @classmethod
    def parse(cls, fields: dict[str, str]) -> Counts:
        states = dict.fromkeys((s.value for s in JobState), 0)
        for key, value in fields.items():
            if key.startswith("state:") and (int(value) or key[6:] in states):
                states[key[6:]] = int(value)
        return cls(
            states=states,
            render_buckets=[int(fields.get(f"render:le:{b}", 0)) for b in RENDER_BUCKETS],
            render_count=int(fields.get("render:count", 0)),
            render_seconds=int(fields.get("render:sum_us", 0)) / 1e6,
            counting="since" in fields)

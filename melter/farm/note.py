"""The Lua that notes a job's state change in its callback outbox (see
:mod:`melter.farm.callbacks`), run at the end of every state-changing script of
:mod:`melter.farm.store`."""

from __future__ import annotations

#: Lua, run at the end of each state-changing script: queue a callback for a changed state.
NOTE = r"""
local function melter_note(P, id)
  local jkey = P .. ':job:' .. id
  local f = redis.call('HMGET', jkey, 'notify', 'state', 'notified')
  if f[1] ~= '1' or not f[2] or f[2] == f[3] then return end
  redis.call('HSET', jkey, 'notified', f[2])
  local seq = redis.call('HINCRBY', jkey, 'notify_seq', 1)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  local q = P .. ':cbq:' .. id
  local n = redis.call('RPUSH', q, cjson.encode({sequence = seq, state = f[2],
    previous = f[3] or '', at = now, tries = 0}))
  redis.call('EXPIRE', q, 86400 * 30)
  if n == 1 then redis.call('ZADD', P .. ':outbox', now, id) end
end
"""


def with_note(source: str) -> str:
    """A store script that also notes a state change of the job ``ARGV[2]``."""
    return (NOTE + "local function melter_body()\n" + source + "\nend\n"
            "local melter_result = melter_body()\nmelter_note(ARGV[1], ARGV[2])\n"
            "return melter_result\n")

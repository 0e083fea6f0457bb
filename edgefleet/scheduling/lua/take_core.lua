-- take_next(class, node, pid, lease ttl, max lost attempts, claim token, lease grace seconds, placed
-- plugins (a JSON list: the worker places their subtasks itself, by where a model is warm), takes
-- for (claim_core.lua: how long the slot stays a taker)):
-- a slot of `node` that is free now takes the class's next ready subtask (release_ready, direct)
-- and, unless it reads input artifacts, is pinned to another node or its plugin is placed, claims
-- it for `pid` at once (claim_attempt). nil when nothing is ready, else {item = what was popped,
-- claim = the claim's answer, absent when not claimed}. Shared by take.lua and complete_take.lua.
--
-- Its `takes for` > 0 and nothing ready: the slot lingers until then, woken (K.wake) when work is
-- made ready, and stays one of the class's takers meanwhile (no message is released for it). With
-- 0 it stops being a taker: the last take of a chain whose time is up, atomic with finding nothing.
local function take_next(cls, node, pid, ttl, max_lost, token, lease_grace, placed_json, takes_for)
  local me = node .. '|' .. pid
  local item = release_ready(cls, 1, 0, true)[1]
  if not item then
    if takes_for and takes_for > 0 then
      -- (pruned here, where it grows: a pool process that died lingering leaves its entry)
      redis.call('ZREMRANGEBYSCORE', K.lingering(cls), '-inf', NOW)
      redis.call('ZADD', K.lingering(cls), NOW + takes_for, me)
      redis.call('ZADD', K.takers(cls), NOW + takes_for, me)
    else
      redis.call('ZREM', K.lingering(cls), me)
      redis.call('ZREM', K.takers(cls), me)
    end
    return nil
  end
  redis.call('ZREM', K.lingering(cls), me)
  local placed = {}
  for _, name in ipairs(cjson.decode(placed_json)) do placed[name] = true end
  local base = string.gsub(item.queue, '%.express$', '')
  if item.inputs or placed[item.plugin] or (base ~= cls and base ~= 'node.' .. node .. '.' .. cls) then
    -- (claimed, if it stays here, as a delivery is: that claim makes the slot a taker again)
    redis.call('ZREM', K.takers(cls), me)
    return {item = item}
  end
  local claim = claim_attempt(item.job_id, item.subtask_id, tostring(item.attempt), node, pid, ttl, '', max_lost,
    token, lease_grace, takes_for)
  return {item = item, claim = claim}
end

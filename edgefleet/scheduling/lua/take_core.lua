-- take_next(class, node, pid, lease ttl, max lost attempts, claim token, lease grace seconds, placed
-- plugins (a JSON list: the worker places their subtasks itself, by where a model is warm), takes
-- for (claim_core.lua: how long the slot stays a taker)):
-- a slot of `node` that is free now takes the class's next ready subtask (release_ready, direct)
-- and, unless it reads input artifacts, is pinned to another node or its plugin is placed, claims
-- it for `pid` at once (claim_attempt). nil when nothing is ready, else {item = what was popped,
-- claim = the claim's answer, absent when not claimed}. Shared by take.lua and complete_take.lua.
local function take_next(cls, node, pid, ttl, max_lost, token, lease_grace, placed_json, takes_for)
  local item = release_ready(cls, 1, 0, true)[1]
  if not item then return nil end
  local placed = {}
  for _, name in ipairs(cjson.decode(placed_json)) do placed[name] = true end
  local base = string.gsub(item.queue, '%.express$', '')
  if item.inputs or placed[item.plugin] or (base ~= cls and base ~= 'node.' .. node .. '.' .. cls) then
    return {item = item}
  end
  local claim = claim_attempt(item.job_id, item.subtask_id, tostring(item.attempt), node, pid, ttl, '', max_lost,
    token, lease_grace, takes_for)
  return {item = item, claim = claim}
end

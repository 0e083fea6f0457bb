-- ARGV: prefix, class, node, pid, lease ttl, max lost attempts, claim token, lease grace seconds,
-- placed plugins (a JSON list: the worker places their subtasks itself, by where a model is warm).
-- A slot of `node` that is free now takes the class's next ready subtask (release_ready, direct)
-- and, unless it reads input artifacts, is pinned to another node or its plugin is placed, claims
-- it for `pid` in the same call (claim_attempt). '' when nothing is ready, else
-- {"item": what was popped, "claim": the claim's answer, absent when not claimed} as JSON.
local cls, node = ARGV[2], ARGV[3]
local item = release_ready(cls, 1, 0, true)[1]
if not item then return '' end
local placed = {}
for _, name in ipairs(cjson.decode(ARGV[9])) do placed[name] = true end
local base = string.gsub(item.queue, '%.express$', '')
if item.inputs or placed[item.plugin] or (base ~= cls and base ~= 'node.' .. node .. '.' .. cls) then
  return cjson.encode({item = item})
end
local claim = claim_attempt(item.job_id, item.subtask_id, tostring(item.attempt), node, ARGV[4], tonumber(ARGV[5]),
  '', tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8]) or 0)
return cjson.encode({item = item, claim = claim})

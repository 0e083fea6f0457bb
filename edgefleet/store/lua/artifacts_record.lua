-- ARGV: prefix, jid, sid, attempt, node, pid, records json (a list), max bytes of the job's artifacts
-- The artifacts a succeeding attempt produced, written before it reports success (complete.lua),
-- and only while it still owns the subtask: a stale attempt (reaped, taken over) records nothing.
-- A subtask's list replaces what an earlier attempt of it recorded. Refused ('too_large') when the
-- job's artifacts would then exceed the limit. Returns {verdict, the job's artifact bytes}.
local jid, sid, attempt, node, pid = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local f = redis.call('HMGET', K.subtask(jid, sid), 'state', 'attempt', 'owner_node', 'owner_pid')
if f[1] ~= 'running' or f[2] ~= attempt or f[3] ~= node or f[4] ~= pid then
  return {'stale', 0}
end
local records = cjson.decode(ARGV[7])
local jak = K.job_artifacts(jid)
local total = 0
local all = redis.call('HGETALL', jak)
for i = 1, #all, 2 do
  if all[i] ~= sid then
    for _, r in ipairs(cjson.decode(all[i + 1])) do total = total + tonumber(r.size) end
  end
end
for _, r in ipairs(records) do total = total + tonumber(r.size) end
if total > tonumber(ARGV[8]) then return {'too_large', total} end
if #records == 0 then
  redis.call('HDEL', jak, sid)
  return {'ok', total}
end
local tenant = redis.call('HGET', K.job(jid), 'tenant') or ''
for _, r in ipairs(records) do
  local ak = K.artifact(r.id)
  if redis.call('EXISTS', ak) == 0 then
    redis.call('HSET', ak, 'size', r.size, 'kind', r.kind, 'name', r.name, 'node', node, 'created_at', NOW)
  end
  redis.call('SADD', K.artifact_holders(r.id), node)
  if tenant ~= '' then redis.call('ZADD', K.tenant_artifacts(tenant), NOW, r.id) end
end
redis.call('HSET', jak, sid, ARGV[7])
return {'ok', total}

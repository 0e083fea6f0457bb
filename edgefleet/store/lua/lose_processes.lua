-- ARGV: prefix, node, pids json, max lost attempts. Processes of `node` that its supervisor saw
-- die: their attempts are lost now, not when their leases run out, so they run again at once
-- on any box. Returns the resource classes that have a new attempt ready.
local node, max_lost = ARGV[2], tonumber(ARGV[4])
local dead = {}
for _, p in ipairs(cjson.decode(ARGV[3])) do dead[tostring(p)] = true end
local classes, out = {}, {}
for _, m in ipairs(redis.call('ZRANGE', K.running(), 0, -1)) do
  local sep = string.find(m, '|', 1, true)
  local jid = string.sub(m, 1, sep - 1)
  local sid = string.sub(m, sep + 1)
  local f = redis.call('HMGET', K.subtask(jid, sid), 'state', 'owner_node', 'owner_pid', 'resource_class')
  if f[1] == 'running' and f[2] == node and dead[f[3]] then
    local why = 'process ' .. f[3] .. ' on node ' .. node .. ' died'
    if count_lost(jid, sid, max_lost, why) == 'lost' then
      requeue_lost(jid, sid, why)
      if not classes[f[4]] then classes[f[4]] = true; table.insert(out, f[4]) end
    end
  end
end
return out

-- ARGV: prefix, max per call. Due retries become ready again.
local due = redis.call('ZRANGEBYSCORE', K.delayed(), '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  redis.call('ZREM', K.delayed(), m)
  local sep = string.find(m, '|', 1, true)
  local jid = string.sub(m, 1, sep - 1)
  local sid = string.sub(m, sep + 1)
  if redis.call('HGET', K.subtask(jid, sid), 'state') == 'retry_wait' then make_ready(jid, sid) end
end
return #due

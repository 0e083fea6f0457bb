-- ARGV: prefix, jid, sid, attempt, node, pid, state json
local jid, sid, attempt, node, pid = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local sk = K.subtask(jid, sid)
local f = redis.call('HMGET', sk, 'state', 'attempt', 'owner_node', 'owner_pid')
if f[1] ~= 'running' or f[2] ~= attempt or f[3] ~= node or f[4] ~= pid then
  return 0
end
redis.call('HSET', sk, 'checkpoint', ARGV[7], 'checkpoint_at', NOW)
return 1

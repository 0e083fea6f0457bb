-- ARGV: prefix, jid, sid, attempt, node, pid, lease ttl, progress ('' or number), message
local jid, sid, attempt, node, pid, ttl = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local sk = K.subtask(jid, sid)
local f = redis.call('HMGET', sk, 'state', 'attempt', 'owner_node', 'owner_pid')
if f[1] ~= 'running' or f[2] ~= attempt or f[3] ~= node or f[4] ~= pid then
  return {'lost', f[1] or 'gone'}
end
redis.call('ZADD', K.running(), 'XX', NOW + ttl, member(jid, sid))
if ARGV[8] ~= '' then
  redis.call('HSET', sk, 'progress', ARGV[8], 'progress_message', ARGV[9])
  event(jid, 'progress', sid, nil, {progress = tonumber(ARGV[8]), message = ARGV[9]})
end
return {'ok', redis.call('HGET', K.job(jid), 'state')}

-- ARGV: prefix, jid, sid, attempt, node, pid, max lost attempts, why.
-- The attempt's plugin process was killed by something no limit of its own explains (the OOM
-- killer, an operator): a lost attempt, not a failed one. Returns {'requeued', class} (a new
-- attempt, ready now), {'cancelled'|'failed', ''} or {'stale', state}.
local jid, sid, attempt, node, pid = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local sk = K.subtask(jid, sid)
local f = redis.call('HMGET', sk, 'state', 'attempt', 'owner_node', 'owner_pid', 'resource_class')
if f[1] ~= 'running' or f[2] ~= attempt or f[3] ~= node or f[4] ~= pid then
  return {'stale', f[1] or 'gone'}
end
redis.call('HSET', sk, 'last_node', node)
local verdict = count_lost(jid, sid, tonumber(ARGV[7]), ARGV[8])
if verdict ~= 'lost' then return {verdict, ''} end
requeue_lost(jid, sid, ARGV[8])
return {'requeued', f[5]}

-- ARGV: prefix, schedule id, 'pause' | 'resume', next_at and due_at (ms; resume only).
-- Fire times that pass while a schedule is paused are not missed runs: resuming goes on from now.
local sid = ARGV[2]
local sk = K.schedule(sid)
local state = redis.call('HGET', sk, 'state')
if not state then return 'gone' end
if ARGV[3] == 'pause' then
  redis.call('ZREM', K.schedules_due(), sid)
  if state ~= 'paused' then redis.call('HSET', sk, 'state', 'paused', 'updated_at', NOW) end
  return 'paused'
end
if state == 'active' then return 'active' end
redis.call('HSET', sk, 'state', 'active', 'next_at', ARGV[4], 'updated_at', NOW)
redis.call('ZADD', K.schedules_due(), ARGV[5], sid)
return 'active'

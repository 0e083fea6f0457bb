-- ARGV: prefix, schedule id. The schedule, its runs and its pending claims; 1 if it existed.
-- Jobs it made stay (they are the tenant's jobs, deleted by retention like any other).
local sid = ARGV[2]
local sk = K.schedule(sid)
local tenant = redis.call('HGET', sk, 'tenant')
if not tenant then return 0 end
redis.call('DEL', sk, K.schedule_runs(sid), K.schedule_run(sid))
redis.call('ZREM', K.schedules(), sid)
redis.call('ZREM', K.tenant_schedules(tenant), sid)
redis.call('ZREM', K.schedules_due(), sid)
local prefix = sid .. '|'
for _, m in ipairs(redis.call('ZRANGE', K.schedules_pending(), 0, -1)) do
  if string.sub(m, 1, #prefix) == prefix then redis.call('ZREM', K.schedules_pending(), m) end
end
return 1

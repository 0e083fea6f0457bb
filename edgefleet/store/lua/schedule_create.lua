-- ARGV: prefix, schedule id, tenant, fields (JSON object of strings), most schedules per tenant,
-- due_at (ms; '' when created paused). A new schedule, in the indexes; 'full' past the tenant's limit.
local sid, tenant = ARGV[2], ARGV[3]
local sk = K.schedule(sid)
if redis.call('EXISTS', sk) == 1 then return 'exists' end
if redis.call('ZCARD', K.tenant_schedules(tenant)) >= tonumber(ARGV[5]) then return 'full' end
for name, value in pairs(cjson.decode(ARGV[4])) do redis.call('HSET', sk, name, value) end
redis.call('HSET', sk, 'id', sid, 'tenant', tenant, 'created_at', NOW, 'updated_at', NOW,
  'fired', 0, 'skipped', 0, 'pending', '', 'last_job', '', 'last_fire', '')
redis.call('ZADD', K.schedules(), NOW, sid)
redis.call('ZADD', K.tenant_schedules(tenant), NOW, sid)
if ARGV[6] ~= '' then redis.call('ZADD', K.schedules_due(), ARGV[6], sid) end
return 'created'

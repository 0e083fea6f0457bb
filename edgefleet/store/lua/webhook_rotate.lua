-- ARGV: prefix, tenant, new secret, grace seconds. The old secret stays valid for the grace.
local key = K.webhook_secret(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local old = redis.call('HGET', key, 'current')
if old and tonumber(ARGV[4]) > 0 then
  redis.call('HSET', key, 'previous', old, 'previous_until', now + tonumber(ARGV[4]))
else
  redis.call('HDEL', key, 'previous', 'previous_until')
end
redis.call('HSET', key, 'current', ARGV[3], 'created_at', now)
return 1

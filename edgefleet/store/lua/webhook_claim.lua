-- ARGV: prefix, delivery id, lease seconds. The next attempt's number, or false when the
-- delivery is not due (or no longer pending).
local due, rk = K.webhooks_due(), K.webhook(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local score = redis.call('ZSCORE', due, ARGV[2])
if not score or tonumber(score) > now then return false end
if redis.call('HGET', rk, 'state') ~= 'pending' then
  redis.call('ZREM', due, ARGV[2])
  return false
end
local attempt = redis.call('HINCRBY', rk, 'attempt', 1)
redis.call('ZADD', due, now + tonumber(ARGV[3]), ARGV[2])
redis.call('HSET', rk, 'claimed_at', now)
return attempt

-- ARGV: prefix, class, depth, reason
local key = K.target_depth()
local old = redis.call('HGET', key, ARGV[2])
redis.call('HSET', key, ARGV[2], ARGV[3])
log_change('target_depth', {[ARGV[2]] = {old = tonumber(old), new = tonumber(ARGV[3])}}, ARGV[4])
return 1

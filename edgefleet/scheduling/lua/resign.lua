-- ARGV: prefix, router id. Give the lease up (only if still ours).
local key = K.leader()
if redis.call('GET', key) == ARGV[2] then return redis.call('DEL', key) end
return 0

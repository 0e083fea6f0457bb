-- ARGV: prefix, router id, lease ms. Acquire or renew the release lease: 1 if we hold it.
local key = K.leader()
local holder = redis.call('GET', key)
if holder == ARGV[2] then
  redis.call('PEXPIRE', key, ARGV[3])
  return 1
end
if not holder and redis.call('SET', key, ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
return 0

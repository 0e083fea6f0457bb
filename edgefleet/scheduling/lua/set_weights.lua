-- ARGV: prefix, changes json {name: number}, reason, classes json. Set, log, rescore: one step.
local changes = cjson.decode(ARGV[2])
local key = K.weights()
local logged = {}
for name, value in pairs(changes) do
  local old = redis.call('HGET', key, name)
  redis.call('HSET', key, name, value)
  logged[name] = {old = tonumber(old), new = tonumber(value)}
end
log_change('weights', logged, ARGV[3])
local w = load_weights()
local n = 0
for _, cls in ipairs(cjson.decode(ARGV[4])) do n = n + rescore(cls, w) end
return n

-- ARGV: prefix, defaults json {name: number}. A router's settings fill in what Redis lacks.
local n = 0
for name, value in pairs(cjson.decode(ARGV[2])) do
  n = n + redis.call('HSETNX', K.weights(), name, value)
end
return n

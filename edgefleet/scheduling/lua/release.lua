-- ARGV: prefix, class, max to release, default target depth of the class (see release_core.lua).
local out = release_ready(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), false)
return cjson.encode(out)

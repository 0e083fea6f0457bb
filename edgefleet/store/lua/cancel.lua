-- ARGV: prefix, jid
local jid = ARGV[2]
local state = redis.call('HGET', K.job(jid), 'state')
if not state then return 'missing' end
if state ~= 'running' then return state end
return finish_job(jid, 'cancelled', 'cancelled by request', nil)

-- ARGV: prefix, members "jid|sid|attempt"... (sent to the broker: no longer at risk)
for i = 2, #ARGV do redis.call('ZREM', K.dispatching(), ARGV[i]) end
return #ARGV - 1

-- KEYS: live-node zset, node-info hash. ARGV: node.
local refused = wrong_type(KEYS[1], 'zset') or wrong_type(KEYS[2], 'hash')
if refused then return refused end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return {'OK'}

-- KEYS: live-node zset, node-info hash. ARGV: node, info, ttl ms.
local refused = wrong_type(KEYS[1], 'zset') or wrong_type(KEYS[2], 'hash')
if refused then return refused end
local now = now_ms()
local previous = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
local was_live = 0
if previous and previous > now then was_live = 1 end
redis.call('ZADD', KEYS[1], int(now + tonumber(ARGV[3])), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {'OK', was_live}

-- KEYS: live-node zset, node-info hash. Forgets expired nodes, then lists
-- the live ones as node, info, ms left.
local refused = wrong_type(KEYS[1], 'zset') or wrong_type(KEYS[2], 'hash')
if refused then return refused end
local now = now_ms()
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, node in ipairs(dead) do
  redis.call('ZREM', KEYS[1], node)
  redis.call('HDEL', KEYS[2], node)
end
local live = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {'OK'}
for i = 1, #live, 2 do
  local info = redis.call('HGET', KEYS[2], live[i]) or ''
  table.insert(out, live[i])
  table.insert(out, info)
  table.insert(out, tonumber(live[i + 1]) - now)
end
return out

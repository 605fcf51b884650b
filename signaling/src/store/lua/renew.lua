-- KEYS: lease, call record. ARGV: node, epoch, ttl ms, retain ms.
local refused = wrong_type(KEYS[1], 'hash') or wrong_type(KEYS[2], 'hash')
if refused then return refused end
local now = now_ms()
local ttl, retain = tonumber(ARGV[3]), tonumber(ARGV[4])
local lease, why = read_lease(KEYS[1])
if lease == false then return {'MALFORMED', why} end
-- Also after expiry: if nobody took over, the epoch proves nobody else wrote.
if not lease or lease.owner ~= ARGV[1] or lease.epoch ~= tonumber(ARGV[2]) then return stale(lease, now) end
local phase = redis.call('HGET', KEYS[2], 'p')
redis.call('HSET', KEYS[1], 'x', int(now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl + retain)
if phase and tonumber(phase) ~= 2 then redis.call('PEXPIRE', KEYS[2], ttl + retain) end
return {'OK', lease.epoch, ttl}

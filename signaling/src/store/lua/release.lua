-- KEYS: lease. ARGV: node, epoch, retain ms. The record stays (expired) so
-- the next owner's epoch continues from it.
local refused = wrong_type(KEYS[1], 'hash')
if refused then return refused end
local now = now_ms()
local lease, why = read_lease(KEYS[1])
if lease == false then return {'MALFORMED', why} end
if not lease or lease.owner ~= ARGV[1] or lease.epoch ~= tonumber(ARGV[2]) then return stale(lease, now) end
redis.call('HSET', KEYS[1], 'x', int(now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'OK'}

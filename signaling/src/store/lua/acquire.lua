-- KEYS: lease, call record. ARGV: node, ttl ms, retain ms.
local refused = wrong_type(KEYS[1], 'hash') or wrong_type(KEYS[2], 'hash')
if refused then return refused end
local now = now_ms()
local node, ttl, retain = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, why = read_lease(KEYS[1])
if lease == false then return {'MALFORMED', why} end
local epoch
if lease and lease.expires > now then
  if lease.owner ~= node then return {'HELD', lease.owner, lease.epoch, lease.expires - now} end
  -- The live holder asking again (a retry): the same lease, renewed.
  epoch = lease.epoch
else
  -- A new owner: above the last epoch of this call, and above the clock in
  -- ms, so an epoch is never handed out twice even when the record was
  -- forgotten (expired, or Redis restarted empty).
  epoch = now
  if lease and lease.epoch + 1 > epoch then epoch = lease.epoch + 1 end
end
local phase = redis.call('HGET', KEYS[2], 'p')
redis.call('HSET', KEYS[1], 'o', node, 'e', int(epoch), 'x', int(now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl + retain)
if phase and tonumber(phase) ~= 2 then redis.call('PEXPIRE', KEYS[2], ttl + retain) end
return {'OK', epoch, ttl}

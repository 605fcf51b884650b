-- KEYS: lease. The live lease as owner, epoch, ms left; nothing if none.
local refused = wrong_type(KEYS[1], 'hash')
if refused then return refused end
local now = now_ms()
local lease, why = read_lease(KEYS[1])
if lease == false then return {'MALFORMED', why} end
if lease and lease.expires > now then return {'OK', lease.owner, lease.epoch, lease.expires - now} end
return {'OK'}

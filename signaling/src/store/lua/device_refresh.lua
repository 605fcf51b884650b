-- KEYS: device location. ARGV: node, ttl ms.
local refused = wrong_type(KEYS[1], 'string')
if refused then return refused end
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then return {'NOTHOLDER', holder or nil} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {'OK'}

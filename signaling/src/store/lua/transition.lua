-- KEYS: lease, call record. ARGV: node, epoch, op id, expected version,
-- phase, detail, retain ms, ops remembered.
-- Order of the checks: a replay answers first (it committed before, whatever
-- happened since), an ended call refuses everything, then the fence, then
-- the version.
local refused = wrong_type(KEYS[1], 'hash') or wrong_type(KEYS[2], 'hash')
if refused then return refused end
local now = now_ms()
if redis.call('EXISTS', KEYS[2]) == 0 then return {'NOTFOUND'} end
local c = redis.call('HMGET', KEYS[2], 'v', 'p', 'r')
local version, phase = tonumber(c[1]), tonumber(c[2])
if not version or not phase then return {'MALFORMED', 'call ' .. KEYS[2] .. ' has no readable version or phase'} end
local first = find_op(c[3], ARGV[3])
if first then return {'REPLAY', first} end
if phase == 2 then return {'TERMINAL', version} end
local refusal, lease_left = fence(KEYS[1], ARGV[1], ARGV[2], now)
if refusal then return refusal end
if version ~= tonumber(ARGV[4]) then return {'CONFLICT', version} end
local next_version = version + 1
redis.call('HSET', KEYS[2], 'v', int(next_version), 'p', ARGV[5], 'o', ARGV[1], 'e', ARGV[2], 'd', ARGV[6], 'r', push_op(c[3], ARGV[3], next_version, tonumber(ARGV[8])))
retain_call(KEYS[2], ARGV[5], lease_left, tonumber(ARGV[7]))
return {'OK', next_version}

-- KEYS: lease, call record. ARGV: node, epoch, op id, phase, detail,
-- retain ms, ops remembered.
local refused = wrong_type(KEYS[1], 'hash') or wrong_type(KEYS[2], 'hash')
if refused then return refused end
local now = now_ms()
if redis.call('EXISTS', KEYS[2]) == 1 then
  local c = redis.call('HMGET', KEYS[2], 'v', 'r')
  local version = tonumber(c[1])
  if not version then return {'MALFORMED', 'call ' .. KEYS[2] .. ' has no readable version'} end
  local first = find_op(c[2], ARGV[3])
  if first then return {'REPLAY', first} end
  return {'EXISTS', version}
end
local refusal, lease_left = fence(KEYS[1], ARGV[1], ARGV[2], now)
if refusal then return refusal end
redis.call('HSET', KEYS[2], 'v', '1', 'p', ARGV[4], 'o', ARGV[1], 'e', ARGV[2], 'd', ARGV[5], 'r', push_op(nil, ARGV[3], 1, tonumber(ARGV[7])))
retain_call(KEYS[2], ARGV[4], lease_left, tonumber(ARGV[6]))
return {'OK', 1}

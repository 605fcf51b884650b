-- Prepended to every script: the server's clock, key types, lease reading,
-- the fencing check and a call record's op-id ring. Redis does not roll a
-- script back on error, so every script reads and checks everything first
-- and writes last.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A number as an integer string (Lua's tostring may use an exponent).
local function int(n)
  return string.format('%.0f', n)
end

-- nil when `key` is absent or of type `want`, else the refusal.
local function wrong_type(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' or t == want then return nil end
  return {'MALFORMED', key .. ' holds a ' .. t .. ', not a ' .. want}
end

-- The lease at `key`: nil when absent, or false and why it cannot be read.
local function read_lease(key)
  local l = redis.call('HMGET', key, 'o', 'e', 'x')
  if not l[1] and not l[2] and not l[3] and redis.call('EXISTS', key) == 0 then return nil end
  local e, x = tonumber(l[2]), tonumber(l[3])
  if not l[1] or not e or not x then return false, 'lease ' .. key .. ' has missing or unreadable fields' end
  return {owner = l[1], epoch = e, expires = x}
end

-- The refusal of a writer that does not hold the lease: the live lease, if any.
local function stale(lease, now)
  if lease and lease.expires > now then return {'STALE', lease.owner, lease.epoch, lease.expires - now} end
  return {'STALE'}
end

-- Whether `node` at `epoch` may write the call now: nil and its lease's ms
-- left, or the refusal.
local function fence(key, node, epoch, now)
  local lease, why = read_lease(key)
  if lease == false then return {'MALFORMED', why} end
  if not lease or lease.owner ~= node or lease.epoch ~= tonumber(epoch) then return stale(lease, now) end
  if lease.expires <= now then return {'EXPIRED'} end
  return nil, lease.expires - now
end

-- The ring is ';<op>=<version>' repeated, newest last.
local function find_op(ring, op)
  if not ring then return nil end
  local _, last = string.find(ring, ';' .. op .. '=', 1, true)
  if not last then return nil end
  return tonumber(string.match(ring, '^%d+', last + 1))
end

local function push_op(ring, op, version, keep)
  ring = (ring or '') .. ';' .. op .. '=' .. int(version)
  local _, count = string.gsub(ring, ';', '')
  while count > keep do
    ring = string.sub(ring, (string.find(ring, ';', 2, true)))
    count = count - 1
  end
  return ring
end

-- An ended call is kept `retain` ms; a running one its lease's time plus that.
local function retain_call(key, phase, lease_left, retain)
  if tonumber(phase) == 2 then
    redis.call('PEXPIRE', key, retain)
  else
    redis.call('PEXPIRE', key, lease_left + retain)
  end
end

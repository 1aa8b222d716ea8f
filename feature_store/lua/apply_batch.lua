-- Apply a batch of validated order events, their deduplication and the consumer's progress in
-- one atomic step.
--
-- KEYS[1]       progress hash (field "<topic>:<partition>" -> last applied offset)
-- KEYS[2..]     one hash per user in the batch (Cluster-safe: hash tag = the user id)
-- ARGV[1]       msgpack array of events in arrival order, each
--               {user_key_index, event_id, day, ts_ms, cents, purchase} (the index points into KEYS)
-- ARGV[2]       msgpack array of progress pairs {field, offset}
-- ARGV[3]       wall-clock ms (the user's "updated at")
-- ARGV[4]       retention in days: the longest window
-- ARGV[5]       largest event time (ms) in the batch: the progress hash keeps the maximum as
--               "event_clock" ("now" when CLV_CLOCK=event)
--
-- User hash fields: n orders, c net cents, p purchase days, f/l first/last purchase ms,
-- fd first purchase day, fc net cents on fd, ld latest event day, ob oldest kept bucket day,
-- u updated-at ms; o<day>/v<day> day buckets (purchases, net cents); #<event_id> -> day, the
-- dedup set. Buckets and dedup entries of days at or before ld - retention are dropped: no window
-- can see them any more. An event dated that far back (relative to the user's latest event when it
-- arrives) is "too late": rejected, so a dropped dedup entry can never let an event count twice.
-- Returns {applied, duplicates, too_late_indexes}.
local events = cmsgpack.unpack(ARGV[1])
local progress = cmsgpack.unpack(ARGV[2])
local now = ARGV[3]
local retention = tonumber(ARGV[4])

local users = {}
local applied, dups = 0, 0
local late = {}

for i = 1, #events do
  local e = events[i]
  local ki = e[1]
  local key = KEYS[ki]
  local u = users[ki]
  if u == nil then
    local h = redis.call('HMGET', key, 'n', 'c', 'p', 'f', 'l', 'fd', 'fc', 'ld', 'ob')
    u = {n = tonumber(h[1]) or 0, c = tonumber(h[2]) or 0, p = tonumber(h[3]) or 0,
         f = tonumber(h[4]) or -1, l = tonumber(h[5]) or -1, fd = tonumber(h[6]) or -1,
         fc = tonumber(h[7]) or 0, ld = tonumber(h[8]) or -1, ob = tonumber(h[9]),
         days = {}, touched = false}
    users[ki] = u
  end
  local day = e[3]
  if u.ld >= 0 and day <= u.ld - retention then
    table.insert(late, i - 1)
  elseif redis.call('HSETNX', key, '#' .. e[2], day) == 1 then
    applied = applied + 1
    u.touched = true
    local ts, cents, purchase = e[4], e[5], e[6]
    u.c = u.c + cents
    if purchase == 1 then
      u.n = u.n + 1
      if u.f < 0 or ts < u.f then u.f = ts end
      if ts > u.l then u.l = ts end
    end
    local d = u.days[day]
    if d == nil then d = {0, 0}; u.days[day] = d end
    d[1] = d[1] + purchase
    d[2] = d[2] + cents
    if day > u.ld then u.ld = day end
  else
    dups = dups + 1
  end
end

for ki, u in pairs(users) do
  if u.touched then
    local key = KEYS[ki]
    local old_fd = u.fd
    local new_first = old_fd
    if u.f >= 0 then new_first = math.floor(u.f / 86400000) end
    for day, d in pairs(u.days) do
      if d[1] > 0 then
        -- A new purchase day exactly when its bucket held no purchase before.
        if redis.call('HINCRBY', key, 'o' .. day, d[1]) == d[1] then u.p = u.p + 1 end
      end
      redis.call('HINCRBY', key, 'v' .. day, d[2])
      if u.ob == nil or day < u.ob then u.ob = day end
    end
    -- Net cents of the first purchase day (its bucket is always kept: it is within retention).
    if new_first ~= old_fd then
      u.fc = tonumber(redis.call('HGET', key, 'v' .. new_first) or '0')
    elseif u.days[old_fd] then
      u.fc = u.fc + u.days[old_fd][2]
    end
    -- Drop buckets that slid out of the longest window, with their dedup entries.
    local cutoff = u.ld - retention
    if u.ob ~= nil and u.ob <= cutoff then
      local all = redis.call('HGETALL', key)
      local dead = {}
      local oldest = nil
      for j = 1, #all, 2 do
        local name = all[j]
        local c1 = string.sub(name, 1, 1)
        local day = nil
        if c1 == '#' then day = tonumber(all[j + 1])
        elseif c1 == 'o' or c1 == 'v' then day = tonumber(string.sub(name, 2)) end
        if day ~= nil then
          if day <= cutoff then
            table.insert(dead, name)
          elseif c1 ~= '#' and (oldest == nil or day < oldest) then
            oldest = day
          end
        end
      end
      for j = 1, #dead, 500 do
        redis.call('HDEL', key, unpack(dead, j, math.min(j + 499, #dead)))
      end
      u.ob = oldest
    end
    redis.call('HSET', key, 'n', u.n, 'c', u.c, 'p', u.p, 'f', u.f, 'l', u.l, 'fd', new_first,
               'fc', u.fc, 'ld', u.ld, 'u', now)
    if u.ob ~= nil then redis.call('HSET', key, 'ob', u.ob) else redis.call('HDEL', key, 'ob') end
  end
end

local batch_clock = tonumber(ARGV[5])
if batch_clock >= 0 then
  local cur = tonumber(redis.call('HGET', KEYS[1], 'event_clock') or '-1')
  if batch_clock > cur then redis.call('HSET', KEYS[1], 'event_clock', ARGV[5]) end
end

for i = 1, #progress do
  local field, off = progress[i][1], progress[i][2]
  local cur = tonumber(redis.call('HGET', KEYS[1], field) or '-1')
  if off > cur then redis.call('HSET', KEYS[1], field, off) end
end

return {applied, dups, late}

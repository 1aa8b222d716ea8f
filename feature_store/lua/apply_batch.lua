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
--               "event_clock" ("now" when CLV_CLOCK=event); -1 for none
-- ARGV[6]       (optional) msgpack array of {field, offset}: where the batch submitted before
--               this one on each partition ended. If the progress hash is short of one, that
--               batch was not applied (refused while Redis was away, and Redis back in time for
--               this one): this batch is refused too, before any write, with a CLVORDER error,
--               so that no batch is ever applied ahead of one before it
--
-- A user's hash: "h" = one 60-byte little-endian record {orders, net cents, purchase days, first
-- purchase ms, last purchase ms, first purchase day, net cents dated on or before it, latest event day,
-- updated ms, oldest kept day} (int32 counts and days, doubles for cents and ms; at most 64
-- bytes, so the hash keeps its compact listpack encoding); "o<day>"/"v<day>" = purchases / net cents of a day;
-- "#<event_id>" = day, the dedup set. Per user and batch that is one HGET, one HSETNX per event,
-- two HINCRBY per day touched and one HSET: the header is one binary record (Lua's struct is C;
-- decoding msgpack or text in Lua, or every day's bucket, costs several times more).
--
-- Days (buckets and dedup entries) at or before latest day - retention are dropped: no window
-- can see them any more. An event dated that far back (relative to the user's latest event
-- when it arrives) is "too late" and rejected, so a dropped dedup entry can never let an event
-- count twice; a copy that comes after its entry is dropped is judged as a new event (too
-- late, or applied when dated inside the window). Returns {applied, duplicates,
-- too_late_indexes (0-based)}.

if ARGV[6] then
  local expected = cmsgpack.unpack(ARGV[6])
  for i = 1, #expected do
    local field, off = expected[i][1], expected[i][2]
    if tonumber(redis.call('HGET', KEYS[1], field) or '-1') < off then
      return redis.error_reply('CLVORDER the batch before this one on ' .. field ..
        ' (to offset ' .. off .. ') was not applied')
    end
  end
end

local events = cmsgpack.unpack(ARGV[1])
local progress = cmsgpack.unpack(ARGV[2])
local now = tonumber(ARGV[3])
local retention = tonumber(ARGV[4])
local HEADER = '<i4di4ddi4di4di4'

local users = {}
local applied, dups = 0, 0
local late = {}

for i = 1, #events do
  local e = events[i]
  local ki = e[1]
  local key = KEYS[ki]
  local u = users[ki]
  if u == nil then
    local h = redis.call('HGET', key, 'h')
    u = {days = {}, touched = false}
    if h then
      u.n, u.c, u.p, u.f, u.l, u.fd, u.fc, u.ld, u.u, u.ob = struct.unpack(HEADER, h)
    else
      u.n, u.c, u.p, u.f, u.l, u.fd, u.fc, u.ld, u.ob = 0, 0, 0, -1, -1, -1, 0, -1, -1
    end
    users[ki] = u
  end
  local day = e[3]
  -- Dedup first: a redelivered event that was applied is a duplicate, not "too late".
  local id = '#' .. e[2]
  local fresh = redis.call('HSETNX', key, id, day) == 1
  if not fresh and u.ld >= 0 and tonumber(redis.call('HGET', key, id)) <= u.ld - retention then
    -- An entry an earlier event of this batch moved out of the window is gone as of this row
    -- (it is dropped at the batch's end): the copy is judged afresh, as in a batch of its
    -- own, so no decision depends on where the batches end.
    redis.call('HSET', key, id, day)
    fresh = true
  end
  if not fresh then
    dups = dups + 1
  elseif u.ld >= 0 and day <= u.ld - retention then
    redis.call('HDEL', key, id)
    late[#late + 1] = i - 1
  else
    applied = applied + 1
    u.touched = true
    local ts, cents = e[4], e[5]
    local d = u.days[day]
    if d == nil then
      d = {0, 0}
      u.days[day] = d
    end
    if e[6] == 1 then
      d[1] = d[1] + 1
      u.n = u.n + 1
      if u.f < 0 or ts < u.f then u.f = ts end
      if ts > u.l then u.l = ts end
    end
    d[2] = d[2] + cents
    u.c = u.c + cents
    if day > u.ld then u.ld = day end
  end
end

for ki, u in pairs(users) do
  if u.touched then
    local key = KEYS[ki]
    local new_fd = u.fd
    if u.f >= 0 then new_fd = math.floor(u.f / 86400000) end
    for day, d in pairs(u.days) do
      if d[1] > 0 then
        -- A new purchase day exactly when its bucket held no purchase before.
        if redis.call('HINCRBY', key, 'o' .. day, d[1]) == d[1] then u.p = u.p + 1 end
      end
      if d[2] ~= 0 or d[1] == 0 then redis.call('HINCRBY', key, 'v' .. day, d[2]) end
      if u.ob < 0 or day < u.ob then u.ob = day end
    end
    -- Net cents dated on or before the first purchase day (what is not repeat revenue).
    if new_fd >= 0 and new_fd ~= u.fd then
      -- The first purchase day is new or earlier: every day after it is still a bucket (an
      -- event of this batch landed on it, so nothing after it has been dropped).
      local after = 0
      local all = redis.call('HGETALL', key)
      for j = 1, #all, 2 do
        local name = all[j]
        if string.byte(name, 1) == 118 and tonumber(string.sub(name, 2)) > new_fd then  -- 'v'
          after = after + tonumber(all[j + 1])
        end
      end
      u.fc = u.c - after
    elseif new_fd >= 0 then
      for day, d in pairs(u.days) do
        if day <= new_fd then u.fc = u.fc + d[2] end
      end
    end
    local cutoff = u.ld - retention
    if u.ob >= 0 and u.ob <= cutoff then
      -- Days slid out of the longest window: drop their buckets and dedup entries.
      local all = redis.call('HGETALL', key)
      local dead = {}
      local oldest = -1
      for j = 1, #all, 2 do
        local name = all[j]
        local c1 = string.byte(name, 1)
        local day = nil
        if c1 == 35 then day = tonumber(all[j + 1])                    -- '#'
        elseif c1 == 111 or c1 == 118 then day = tonumber(string.sub(name, 2)) end  -- 'o', 'v'
        if day ~= nil then
          if day <= cutoff then
            dead[#dead + 1] = name
          elseif c1 ~= 35 and (oldest < 0 or day < oldest) then
            oldest = day
          end
        end
      end
      for j = 1, #dead, 500 do
        redis.call('HDEL', key, unpack(dead, j, math.min(j + 499, #dead)))
      end
      u.ob = oldest
    end
    redis.call('HSET', key, 'h',
      struct.pack(HEADER, u.n, u.c, u.p, u.f, u.l, new_fd, u.fc, u.ld, now, u.ob))
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

-- bench/wrk.lua's replay at a fixed rate (the soak: python -m bench --soak).
--
-- Usage: wrk -s bench/wrk_paced.lua <url> -- <request file prefix> <ms between a thread's requests>
--
-- Each wrk thread keeps a schedule, as wrk2 does: its n-th request is due n intervals
-- after its first. Before each request on any of its connections, wrk asks delay() how
-- long to wait, which is until the next slot of the schedule; a thread that fell behind
-- (slow answers, a pause of the server's) sends at once until it has caught up, so a
-- stall costs the rate nothing that the server can make up for. Latency is still
-- measured from writing each request, the wait excluded.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk.lua")

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } paced_timespec;
int clock_gettime(int clock_id, paced_timespec *time);
]]
local CLOCK_MONOTONIC = 1
local clock_reading = ffi.new("paced_timespec")

local function now_ms()
   ffi.C.clock_gettime(CLOCK_MONOTONIC, clock_reading)
   return tonumber(clock_reading.tv_sec) * 1000 + tonumber(clock_reading.tv_nsec) / 1e6
end

local replay_init = init

function init(args)
   replay_init(args)
   interval_ms = tonumber(args[2])
   next_due_ms = nil
end

function delay()
   local now = now_ms()
   next_due_ms = next_due_ms or now
   local wait = next_due_ms - now
   next_due_ms = next_due_ms + interval_ms
   if wait <= 0 then
      return 0
   end
   return math.ceil(wait)
end

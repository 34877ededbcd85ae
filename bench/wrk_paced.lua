-- bench/wrk.lua's replay, with a pause before each request on a connection, so that a
-- fixed number of connections sends at a steady rate (the soak: python -m bench --soak).
--
-- Usage: wrk -s bench/wrk_paced.lua <url> -- <request file prefix> <pause in ms>
--
-- wrk waits whole milliseconds between a response and the connection's next request;
-- the fraction is carried over, so the average pause is the one asked for. Latency is
-- still measured from writing each request, the pause excluded.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk.lua")

local replay_init = init

function init(args)
   replay_init(args)
   pause_ms = tonumber(args[2])
   carried_ms = 0
end

function delay()
   carried_ms = carried_ms + pause_ms
   local whole = math.floor(carried_ms)
   carried_ms = carried_ms - whole
   return whole
end

-- Replays pre-signed webhook requests so that no webhook-id is ever sent twice:
-- the bridge answers a repeated id from its deduplication memory without
-- publishing, which would flatter its numbers.
--
-- Usage: wrk -s bench/wrk.lua <url> -- <request file prefix>
--
-- The harness writes one file per wrk thread (<prefix>.1, <prefix>.2, ...),
-- each a sequence of records: 8 ASCII digits giving the length of the raw HTTP
-- request that follows. Each thread walks only its own file. When a file runs
-- out the thread stops instead of wrapping around, and done() reports it, so
-- the harness can reject the run and retry it with a larger pool.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("slice", #threads)
end

function init(args)
   local path = args[1] .. "." .. slice
   local file = assert(io.open(path, "rb"))
   data = file:read("*a")
   file:close()
   offset = 1
   issued = 0
   responses = 0
   non2xx = 0
   exhausted = 0
   -- wrk calls request() once on its first thread before starting, only to check that
   -- it returns valid HTTP, and never sends that one. Its record is used up (so a wrk
   -- without that call would skip an id, never repeat one) but not counted as issued;
   -- the harness's queue count would then expose the difference instead of hiding it.
   validation_call_pending = slice == 1
end

function request()
   if offset > #data then
      exhausted = 1
      wrk.thread:stop()
      -- An empty write sends nothing, so no id is reused while the thread winds down.
      return ""
   end
   local length = tonumber(data:sub(offset, offset + 7))
   local raw = data:sub(offset + 8, offset + 7 + length)
   offset = offset + 8 + length
   if validation_call_pending then
      validation_call_pending = false
   else
      issued = issued + 1
   end
   return raw
end

function response(status, headers, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local issued_total, responses_total, non2xx_total, exhausted_total = 0, 0, 0, 0
   for _, thread in ipairs(threads) do
      issued_total = issued_total + thread:get("issued")
      responses_total = responses_total + thread:get("responses")
      non2xx_total = non2xx_total + thread:get("non2xx")
      exhausted_total = exhausted_total + thread:get("exhausted")
   end
   local errors = summary.errors
   io.write(string.format(
      "BENCH_RESULT {\"duration_us\":%.0f,\"requests\":%.0f,\"bytes\":%.0f," ..
      "\"errors\":{\"connect\":%.0f,\"read\":%.0f,\"write\":%.0f,\"status\":%.0f,\"timeout\":%.0f}," ..
      "\"latency_us\":{\"p50\":%.0f,\"p90\":%.0f,\"p99\":%.0f,\"p999\":%.0f,\"mean\":%.1f,\"max\":%.0f}," ..
      "\"issued\":%.0f,\"responses\":%.0f,\"non2xx\":%.0f,\"exhausted_threads\":%.0f}\n",
      summary.duration, summary.requests, summary.bytes,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.mean, latency.max,
      issued_total, responses_total, non2xx_total, exhausted_total))
end

-- wrk script for bench/run.py: POST /v1/events with unique event ids.
--
-- Configured through the environment (run.py sets these):
--   BENCH_TOKEN         the events:write key
--   BENCH_PREFIX        random prefix of this run; ids are PREFIX-THREAD-COUNTER[-INDEX]
--   BENCH_TIME          the events' time, RFC 3339 (must be within the tenant's lateness window)
--   BENCH_TENANT        the tenant the events are for
--   BENCH_BATCH         1: one event object per request; N > 1: {"events": [N events]}
--   BENCH_MAX_REQUESTS  per-thread cap on requests (a bound on top of wrk's --duration)
--
-- done() prints one line starting with "BENCH_RESULT " holding a JSON object for run.py.

local token = assert(os.getenv("BENCH_TOKEN"), "BENCH_TOKEN is not set")
local prefix = assert(os.getenv("BENCH_PREFIX"), "BENCH_PREFIX is not set")
local event_time = assert(os.getenv("BENCH_TIME"), "BENCH_TIME is not set")
local tenant = os.getenv("BENCH_TENANT") or "bench"
local batch = tonumber(os.getenv("BENCH_BATCH") or "1")
local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "10000000")

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("tid", thread_count)
  table.insert(threads, thread)
end

-- Per-thread state (each wrk thread has its own Lua state).
tid = 0
sent = 0
responses = 0
ok = 0
non2xx = 0
accepted = 0
not_accepted = 0
capped = 0

local headers = {
  ["Authorization"] = "Bearer " .. token,
  ["Content-Type"] = "application/json",
}

local function event(id, n)
  return '{"id":"' .. id .. '","tenant":"' .. tenant
    .. '","type":"compute.vcpu_seconds","quantity":"0.25","time":"' .. event_time
    .. '","subject":"vm-' .. (n % 100) .. '","unit":"s","attributes":{"zone":"eu-1a"}}'
end

function request()
  sent = sent + 1
  local base = prefix .. "-" .. tid .. "-" .. sent
  local body
  if batch == 1 then
    body = event(base, sent)
  else
    local parts = {}
    for i = 1, batch do
      parts[i] = event(base .. "-" .. i, sent + i)
    end
    body = '{"events":[' .. table.concat(parts, ",") .. "]}"
  end
  return wrk.format("POST", "/v1/events", headers, body)
end

function response(status, _, body)
  responses = responses + 1
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  else
    ok = ok + 1
    local count
    if batch == 1 then
      count = body:find('"status": *"accepted"') and 1 or 0
    else
      count = tonumber(body:match('"accepted": *(%d+)')) or 0
    end
    accepted = accepted + count
    not_accepted = not_accepted + (batch - count)
  end
  if responses >= max_requests then
    capped = 1
    wrk.thread:stop()
  end
end

function done(summary, latency, _)
  local totals = { sent = 0, responses = 0, ok = 0, non2xx = 0, accepted = 0,
                   not_accepted = 0, capped = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + thread:get(name)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,'
      .. '"timeouts":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,'
      .. '"sent":%d,"responses":%d,"ok":%d,"non2xx":%d,"accepted":%d,'
      .. '"not_accepted":%d,"capped":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean,
    totals.sent, totals.responses, totals.ok, totals.non2xx, totals.accepted,
    totals.not_accepted, totals.capped))
end
